"""Issue 3, item 7: proxyless gRPC. A grpcio client dials `xds:///meshserve` with a bootstrap
(GRPC_XDS_BOOTSTRAP) naming our server, and reaches the pod holding the model directly:
no Envoy anywhere. It routes by the mm-vmodel-id / mm-model-id header.

Kind: e2e. Our ADS server in-process; grpcio's own xDS client in a subprocess (so its global
xDS state stays out of the test process); two stand-in gRPC runtimes (grpcio servers answering
ModelInfer with their own name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_xds import proxyless
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import proxyless_bootstrap
from meshserve_testing.xds_harness import AdsThread
from meshserve_xds.server import PROXYLESS_GROUP

pytestmark = pytest.mark.e2e

M0, M1 = "m0__isvc-0000000000", "m1__isvc-1111111111"

CLIENT = """
import json, sys, grpc
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
out = []
with grpc.insecure_channel("xds:///meshserve") as ch:
    stub = pbg.GRPCInferenceServiceStub(ch)
    for header, value in json.loads(sys.argv[1]):
        resp = stub.ModelInfer(pb.ModelInferRequest(model_name=value), metadata=[(header, value)], timeout=20, wait_for_ready=True)
        out.append(resp.id)
print(json.dumps(out))
"""


class FakeRuntime(pbg.GRPCInferenceServiceServicer):
    def __init__(self, name: str):
        self.name = name

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:  # noqa: N802
        return pb.ModelInferResponse(model_name=request.model_name, id=self.name)


def _serve(name: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_GRPCInferenceServiceServicer_to_server(FakeRuntime(name), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_grpcio_xds_client_reaches_the_pod_directly(tmp_path: Path) -> None:
    servers = {n: _serve(n) for n in ("pod-0", "pod-1", "activator")}
    ads = AdsThread().start()
    try:
        ep = {n: r.Endpoint("127.0.0.1", 1, port) for n, (_, port) in servers.items()}
        state = r.RoutingState(
            pods={"pod-0": ep["pod-0"], "pod-1": ep["pod-1"]},
            loaded={M0: ["pod-0"], M1: ["pod-1"]},
            aliases={"m0": M0, "m1": M1},
            activator=ep["activator"],
        )
        ads.set(PROXYLESS_GROUP, proxyless.build_all(state))
        boot = tmp_path / "xds-bootstrap.json"
        boot.write_text(proxyless_bootstrap("proxyless-test", "127.0.0.1", ads.port))
        calls = [["mm-vmodel-id", "m0"], ["mm-vmodel-id", "m1"], ["mm-model-id", M1], ["mm-vmodel-id", M0], ["mm-vmodel-id", "cold"]]
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot)}
        out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(calls)], env=env, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == ["pod-0", "pod-1", "pod-1", "pod-0", "activator"]
    finally:
        ads.stop()
        for s, _ in servers.values():
            s.stop(0)


def test_proxyless_group_is_built_from_redis_once_a_client_asks(tmp_path: Path) -> None:
    """The production source builds the proxyless routes only once such a client connected
    (they are a list, O(loaded models)), then serves it like any group."""
    import asyncio

    from meshserve_testing import devmesh
    from meshserve import state as st
    from meshserve.model import Copy, CopyState, Pod, copies_to_json
    from meshserve.settings import Settings
    from meshserve_xds.source import RedisSource

    servers = {n: _serve(n) for n in ("pod-0", "activator")}
    with devmesh.valkey() as v:
        async def seed() -> None:
            s = st.State.from_url(v.url)
            pod = Pod("pod-0", "127.0.0.1", 1, servers["pod-0"][1], 1 << 30)
            await s.commit(
                [["HSET", st.PODS, pod.id, pod.to_json()], ["HSET", st.ALIASES, "m0", M0],
                 ["HSET", st.PLACEMENTS, M0, copies_to_json({"pod-0": Copy(CopyState.LOADED)})]],
                [(st.KIND_POD, pod.id), (st.KIND_ALIAS, "m0"), (st.KIND_PLACEMENT, M0)],
            )
            await s.close()

        asyncio.run(seed())
        ads = AdsThread().start()
        state = ads.call(_state(v.url))
        try:
            assert ads.cache is not None
            src = RedisSource(Settings(redis_url=v.url, activator_grpc_port=servers["activator"][1]), state, ads.cache)
            task = asyncio.run_coroutine_threadsafe(src.run(), ads.loop)
            devmesh.wait_until(lambda: src.rev > 0, 10, "source built")
            assert PROXYLESS_GROUP not in src.published
            boot = tmp_path / "xds-bootstrap.json"
            boot.write_text(proxyless_bootstrap("proxyless-redis", "127.0.0.1", ads.port))
            env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot)}
            calls = [["mm-vmodel-id", "m0"], ["mm-model-id", M0], ["mm-vmodel-id", "cold"]]
            out = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(calls)], env=env, capture_output=True, text=True, timeout=90)
            assert out.returncode == 0, out.stderr[-3000:]
            assert json.loads(out.stdout.strip().splitlines()[-1]) == ["pod-0", "pod-0", "activator"]
            assert PROXYLESS_GROUP in src.published
            task.cancel()
        finally:
            ads.call(state.close())
            ads.stop()
            for s, _ in servers.values():
                s.stop(0)


async def _state(url: str):  # type: ignore[no-untyped-def]
    from meshserve import state as st

    return st.State.from_url(url)
