"""Per-model request concurrency for a ModelMesh SPI runtime that declares it (issue 5).

Kind: real servers. A small SPI runtime of our own (gRPC on 127.0.0.1: ModelRuntime plus a v2
ModelInfer that takes 0.3 s and counts the requests it is serving at once) answers
`limitModelConcurrency` and gives each load a `maxConcurrency`. The loader's real wiring
(`build_pod` from a ServingRuntime YAML) starts its pass-through on the pod's gRPC port; the
requests go to that port as Envoy's would, with `mm-model-id`. Every server is stopped.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from meshserve.settings import Settings
from meshserve_loader.servers.spi import SpiServer
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_proto import model_runtime_pb2 as mr
from meshserve_proto import model_runtime_pb2_grpc as mrg

INFER_SECONDS = 0.3


class LimitingRuntime(SpiServer, pbg.GRPCInferenceServiceServicer):
    """Models whose id starts with `one-` may take one request at a time; the others any number.
    (e2e/test_spi_limits_gateway.py runs it behind a whole mesh too.)"""

    def __init__(self) -> None:
        super().__init__(capacity_bytes=1 << 30, max_loading=2)
        self.in_flight: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.gate: asyncio.Event | None = None  # when set up, inference waits for it instead of sleeping

    async def runtimeStatus(self, request, context):  # noqa: N802
        r = await super().runtimeStatus(request, context)
        r.limit_model_concurrency = True
        return r

    async def loadModel(self, request, context):  # noqa: N802
        r = await super().loadModel(request, context)
        r.max_concurrency = 1 if request.model_id.startswith("one-") else 0
        return r

    async def ModelInfer(self, request, context):  # noqa: N802
        md = dict(context.invocation_metadata())
        name = md.get("mm-model-id") or request.model_name
        if name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not loaded")
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.most[name] = max(self.most.get(name, 0), self.in_flight[name])
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(INFER_SECONDS)
        finally:
            self.in_flight[name] -= 1
        return pb.ModelInferResponse(model_name=name, id=request.id)

    async def ModelStreamInfer(self, requests, context):  # noqa: N802
        md = dict(context.invocation_metadata())
        async for request in requests:
            yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name=md.get("mm-model-id", ""), id=request.id))


SR = """apiVersion: serving.kserve.io/v1alpha1
kind: ServingRuntime
metadata:
  name: limited-spi
spec:
  supportedModelFormats: [{name: string, autoSelect: true}]
  grpcDataEndpoint: port:{port}
  builtInAdapter:
    serverType: modelruntime
    runtimeManagementPort: {port}
"""


@pytest.fixture
async def runtime_port():
    servicer = LimitingRuntime()
    server = grpc.aio.server()
    mrg.add_ModelRuntimeServicer_to_server(servicer, server)
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")  # the port the kernel picked, as the YAML then names it
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(0)


async def limited_pod(tmp_path: Path, port: int, queue_timeout_s: float):  # type: ignore[no-untyped-def]
    """The loader's own pod wiring for the ServingRuntime above: (settings, BuiltPod)."""
    from meshserve_loader.pod import build_pod

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "limited.yaml").write_text(SR.replace("{port}", str(port)))
    (tmp_path / "hello.txt").write_text("hello")
    s = Settings(config_dir=tmp_path / "cfg", data_dir=tmp_path / "data", pod_runtimes="limited-spi", runtime_base_port=0,
                 request_queue_timeout_seconds=queue_timeout_s)
    async with aiohttp.ClientSession() as session:
        return s, await build_pod(s, 0, session)


async def _infer_many(target: str, model: str, n: int) -> list[tuple[grpc.StatusCode, float]]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)

        async def one(i: int) -> tuple[grpc.StatusCode, float]:
            t0 = time.monotonic()
            try:
                await stub.ModelInfer(pb.ModelInferRequest(model_name="alias", id=str(i)), metadata=[("mm-model-id", model)], timeout=30)
                return grpc.StatusCode.OK, time.monotonic() - t0
            except grpc.aio.AioRpcError as e:
                return e.code(), time.monotonic() - t0

        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_a_declared_limit_holds_requests_to_it_and_others_pass(tmp_path: Path, runtime_port) -> None:  # type: ignore[no-untyped-def]
    servicer, port = runtime_port
    s, built = await limited_pod(tmp_path, port, queue_timeout_s=5.0)
    client = built.server.client
    try:
        assert built.pod.grpc_port not in (0, port)  # Envoy is sent to the pass-through, on the port it bound
        for m in ("one-a", "free-b"):
            await client.load(m, {"path": str(tmp_path / "hello.txt"), "format": "string"}, 10)
        assert client.limits.limits == {"one-a": 1}  # what each load answered

        target = f"127.0.0.1:{built.pod.grpc_port}"
        t0 = time.monotonic()
        limited, free = await asyncio.gather(_infer_many(target, "one-a", 4), _infer_many(target, "free-b", 4))
        assert [c for c, _ in limited + free] == [grpc.StatusCode.OK] * 8
        assert servicer.most == {"one-a": 1, "free-b": 4}  # the unlimited model's four ran at once
        # One at a time: the last of the four limited requests waited for the three before it.
        assert max(t for _, t in limited) >= 4 * INFER_SECONDS * 0.9
        assert time.monotonic() - t0 < 10

        # Errors of the runtime come back as they were; the limit goes with the unload.
        (code, _), = await _infer_many(target, "not-loaded", 1)
        assert code == grpc.StatusCode.NOT_FOUND
        await client.unload("one-a")
        assert client.limits.limits == {}
    finally:
        await built.server.stop()


async def test_a_request_that_waits_too_long_gets_resource_exhausted(tmp_path: Path, runtime_port) -> None:  # type: ignore[no-untyped-def]
    servicer, port = runtime_port
    _, built = await limited_pod(tmp_path, port, queue_timeout_s=0.45)
    client = built.server.client
    try:
        await client.load("one-a", {"path": str(tmp_path / "hello.txt"), "format": "string"}, 10)
        servicer.gate = asyncio.Event()  # the first request holds the only slot until released
        async with grpc.aio.insecure_channel(f"127.0.0.1:{built.pod.grpc_port}") as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)

            def call() -> "grpc.aio.UnaryUnaryCall":
                return stub.ModelInfer(pb.ModelInferRequest(model_name="one-a"), metadata=[("mm-model-id", "one-a")], timeout=30)

            first = asyncio.ensure_future(call())
            deadline = time.monotonic() + 10
            while servicer.in_flight.get("one-a", 0) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()  # waits its 0.45 s queue timeout behind the first
            servicer.gate.set()
            assert (await first).model_name == "one-a"
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "model 'one-a' is at its concurrency limit of 1" in refused.value.details()
        assert servicer.most == {"one-a": 1}
    finally:
        await built.server.stop()


def test_status_field_numbers_are_the_spis() -> None:
    f = {fd.name: fd.number for fd in mr.LoadModelResponse.DESCRIPTOR.fields}
    assert f["max_concurrency"] == 2
    assert {fd.name: fd.number for fd in mr.RuntimeStatusResponse.DESCRIPTOR.fields}["limit_model_concurrency"] == 9


async def test_a_stream_passes_through_and_holds_one_slot_while_open(tmp_path: Path, runtime_port) -> None:  # type: ignore[no-untyped-def]
    """ModelStreamInfer through the pass-through: each request goes on and each answer comes
    back while the stream is open; the open stream holds one of its model's slots, so a unary
    request to a model limited to one waits (here past its queue timeout), and is served once
    the stream ends."""
    servicer, port = runtime_port
    s, built = await limited_pod(tmp_path, port, queue_timeout_s=0.5)
    try:
        await built.server.client.load("one-a", {"path": str(tmp_path / "hello.txt"), "format": "string"}, 10)
        target = f"127.0.0.1:{built.pod.grpc_port}"
        more: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

        async def requests():  # type: ignore[no-untyped-def]
            while (req := await more.get()) is not None:
                yield req

        async with grpc.aio.insecure_channel(target) as ch:
            stream = pbg.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(), metadata=[("mm-model-id", "one-a")], timeout=30)
            answers = []
            for i in range(2):
                await more.put(pb.ModelInferRequest(model_name="alias", id=f"s{i}"))
                answers.append(await stream.read())
            assert [(a.infer_response.model_name, a.infer_response.id) for a in answers] == [("one-a", "s0"), ("one-a", "s1")]
            assert [c for c, _ in await _infer_many(target, "one-a", 1)] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
            await more.put(None)
            assert await stream.read() == grpc.aio.EOF
        assert [c for c, _ in await _infer_many(target, "one-a", 1)] == [grpc.StatusCode.OK]
    finally:
        await built.server.stop()
