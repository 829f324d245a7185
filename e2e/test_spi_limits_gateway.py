"""Per-model request concurrency of an SPI runtime, through the gateway (issue 5).

Kind: e2e. `meshserve up` (real Envoy, xDS, placement, Valkey) with one pod whose runtime is a
ModelMesh SPI runtime of our own that limits per-model concurrency (tests/test_runtime_spi_limits.py:
ModelRuntime plus a v2 ModelInfer that takes 0.3 s), serving on 127.0.0.1 in a thread of this
process and stopped at the end. The users' gRPC requests go to the gateway's port with
`mm-vmodel-id`, as ModelMesh clients send them: the first loads the model on first use, then
Envoy routes them to the pod, whose registered gRPC port is the loader's limiting pass-through.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from meshserve_testing import devmesh
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_proto import model_runtime_pb2_grpc as mrg
from tests.test_runtime_spi_limits import SR, LimitingRuntime

pytestmark = pytest.mark.e2e


@pytest.fixture
def spi_runtime() -> Iterator[tuple[LimitingRuntime, int]]:
    """The SPI runtime on its own event loop in a thread, as its own container would be."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def serve() -> None:
        servicer = LimitingRuntime()
        server = grpc.aio.server()
        mrg.add_ModelRuntimeServicer_to_server(servicer, server)
        pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box.update(servicer=servicer, server=server, port=port)
        ready.set()

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    ready.wait(10)
    try:
        yield box["servicer"], box["port"]  # type: ignore[misc]
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(10)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def test_a_limited_model_serves_one_request_at_a_time_through_the_gateway(spi_runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    servicer, port = spi_runtime
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "runtime.yaml").write_text(SR.replace("{port}", str(port)))
    for name in ("one-model", "free-model"):
        (cfg / f"{name}.yaml").write_text(devmesh.inference_service(name, "string", devmesh.pvc_storage("models", "hello.txt")))
    with devmesh.mesh(config_dir=cfg, pods=1, pod_runtimes="limited-spi") as m:
        (m.data_dir / "pvc" / "models").mkdir(parents=True)
        (m.data_dir / "pvc" / "models" / "hello.txt").write_text("hello")

        async def burst(alias: str, n: int) -> list[str]:
            async with grpc.aio.insecure_channel(m.grpc) as ch:
                stub = pbg.GRPCInferenceServiceStub(ch)
                calls = [stub.ModelInfer(pb.ModelInferRequest(model_name=alias, id=str(i)), metadata=[("mm-vmodel-id", alias)], timeout=90)
                         for i in range(n)]
                return [r.model_name for r in await asyncio.gather(*calls)]

        async def scenario() -> None:
            # First use loads each model (through the activator); then four at once of each.
            await burst("one-model", 1)
            await burst("free-model", 1)
            servicer.most.clear()
            limited, free = await asyncio.gather(burst("one-model", 4), burst("free-model", 4))
            assert all(n.startswith("one-model__isvc-") for n in limited) and all(n.startswith("free-model__isvc-") for n in free)

        asyncio.run(scenario())
        ids = {n.split("__")[0]: n for n in servicer.most}
        assert servicer.most == {ids["one-model"]: 1, ids["free-model"]: 4}, servicer.most
        assert "gRPC pass-through on" in m.log()  # the loader's limiting pass-through is in the path
