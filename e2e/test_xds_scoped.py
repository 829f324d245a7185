"""Issue 3: the scoped-RDS layout (MESHSERVE_XDS_LAYOUT=scoped) end to end on the production
source: a placement change costs what it touched, REST and gRPC route by one key.

Kind: e2e. Real Valkey, the production RedisSource in scoped mode with our ADS server
in-process, a real Envoy over delta xDS; stand-in pods and activator (tiny HTTP servers for
REST, grpcio servers for gRPC).
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any, Iterator

import grpc
import pytest
from prometheus_client import REGISTRY

from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy, http, wait_for
from meshserve_xds.source import RedisSource

pytestmark = pytest.mark.e2e

M0, M1 = "m0__isvc-0000000000", "m1__isvc-1111111111"


class FakeRuntime(pbg.GRPCInferenceServiceServicer):
    def __init__(self, name: str):
        self.name = name

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:  # noqa: N802
        return pb.ModelInferResponse(model_name=dict(context.invocation_metadata()).get(r.MODEL_ID_HEADER, ""), id=self.name)


def _grpc(name: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_GRPCInferenceServiceServicer_to_server(FakeRuntime(name), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _commit(url: str, ops: list[list[Any]], changes: list[tuple[str, str]]) -> None:
    async def go() -> None:
        s = st.State.from_url(url)
        try:
            await s.commit(ops, changes)
        finally:
            await s.close()

    asyncio.run(go())


def _pushed() -> float:
    return sum(s.value for m in REGISTRY.collect() if m.name == "meshserve_xds_pushed_bytes" for s in m.samples if s.name.endswith("_total"))


class Mesh:
    def __init__(self, url: str, rest: int, grpc_port: int, ads: AdsThread, settings: Settings):
        self.url, self.rest, self.grpc = url, f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}"
        self.ads, self.settings = ads, settings

    def digests(self, ads: AdsThread) -> dict[str, dict[str, bytes]]:
        assert ads.cache is not None
        g = ads.run(lambda: ads.cache.group("meshserve-gateway"))  # type: ignore[union-attr]
        return {t: dict(g.types[t].digests) for t in (r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE, r.CLUSTER_TYPE)}

    def upstream(self, name: str) -> str:
        code, body = http(f"{self.rest}/v2/models/{name}/infer", data=b"{}")
        return body.get("upstream", f"HTTP {code}")

    def infer(self, model: str, metadata: list[tuple[str, str]] | None = None) -> pb.ModelInferResponse:
        with grpc.insecure_channel(self.grpc) as ch:
            return pbg.GRPCInferenceServiceStub(ch).ModelInfer(pb.ModelInferRequest(model_name=model), metadata=metadata or [], timeout=10)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    rest_ups = {n: Upstream(n) for n in ("pod-0", "pod-1", "activator")}
    grpcs = {n: _grpc(n) for n in rest_ups}
    for u in rest_ups.values():
        u.__enter__()
    try:
        with devmesh.valkey() as v:
            pods = [Pod(n, "127.0.0.1", rest_ups[n].port, grpcs[n][1], 1 << 30) for n in ("pod-0", "pod-1")]
            _commit(
                v.url,
                [["HSET", st.PODS, p.id, p.to_json()] for p in pods]
                + [["HSET", st.MODELS, m, ModelSpec(m, a, "sklearn", {}).to_json()] for m, a in ((M0, "m0"), (M1, "m1"))]
                + [["HSET", st.ALIASES, "m0", M0], ["HSET", st.ALIASES, "m1", M1],
                   ["HSET", st.PLACEMENTS, M0, copies_to_json({"pod-0": Copy(CopyState.LOADED)})]],
                [(st.KIND_ALL, "")],
            )
            admin = 0  # Envoy binds free admin and listener ports (gateway ports 0); the harness reads them back
            settings = Settings(redis_url=v.url, gateway_rest_port=0, gateway_grpc_port=0, debounce_quiet_ms=5,
                                activator_rest_port=rest_ups["activator"].port, activator_grpc_port=grpcs["activator"][1])
            ads = AdsThread().start()
            state = ads.call(_state(v.url))
            try:
                assert ads.cache is not None
                src = RedisSource(settings, state, ads.cache, layout="scoped")
                task = asyncio.run_coroutine_threadsafe(src.run(), ads.loop)
                with envoy(gateway_bootstrap("gw-scoped", "127.0.0.1", ads.port, admin, delta=True), admin) as gw:
                    m = Mesh(v.url, gw.listener_port(r.REST), gw.listener_port(r.GRPC), ads, settings)
                    wait_for(lambda: m.upstream("m0") == "pod-0", 20, "m0 routed")
                    yield m
                task.cancel()
            finally:
                ads.call(state.close())
                ads.stop()
    finally:
        for u in rest_ups.values():
            u.__exit__()
        for s, _ in grpcs.values():
            s.stop(0)


async def _state(url: str) -> st.State:
    return st.State.from_url(url)


def test_rest_by_alias_and_id_cold_health_and_unknown(mesh: Mesh) -> None:
    code, body = http(f"{mesh.rest}/v2/models/m0/infer", data=b"{}")
    assert body["upstream"] == "pod-0" and body["path"] == f"/v2/models/{M0}/infer" and body["model"] == M0
    assert mesh.upstream(M0) == "pod-0"
    code, body = http(f"{mesh.rest}/v2/models/m0")  # metadata: the bare path is rewritten too
    assert body["upstream"] == "pod-0" and body["path"] == f"/v2/models/{M0}"
    assert http(f"{mesh.rest}/v2/models/m0x/infer", data=b"{}")[0] == 404  # a longer name is not m0
    assert mesh.upstream("m1") == "activator"  # registered, not loaded: loads on demand
    assert mesh.upstream(M1) == "activator"
    assert http(f"{mesh.rest}/v2/health/live")[1]["upstream"] == "activator"
    code, body = http(f"{mesh.rest}/v2/models/never-registered/infer", data=b"{}")
    assert code == 404 and "never-registered" in body["error"], body


def test_grpc_by_header_and_by_message(mesh: Mesh) -> None:
    assert mesh.infer("x", [("mm-vmodel-id", "m0")]).id == "pod-0"
    assert mesh.infer("x", [("mm-model-id", M0)]).id == "pod-0"
    resp = mesh.infer("m0")  # no header: field 1 of the message
    assert resp.id == "pod-0" and resp.model_name == M0
    assert mesh.infer("m1").id == "activator"


def test_a_change_costs_what_it_touched(mesh: Mesh) -> None:
    before = _pushed()
    _commit(mesh.url, [["HSET", st.PLACEMENTS, M0, copies_to_json({"pod-1": Copy(CopyState.LOADED)})]], [(st.KIND_PLACEMENT, M0)])
    wait_for(lambda: mesh.upstream("m0") == "pod-1", 10, "m0 moved")
    assert mesh.infer("m0").id == "pod-1"
    moved = _pushed() - before
    assert 0 < moved < 10_000, moved
    before = _pushed()
    _commit(mesh.url, [["HSET", st.PLACEMENTS, M1, copies_to_json({"pod-0": Copy(CopyState.LOADED)})]], [(st.KIND_PLACEMENT, M1)])
    wait_for(lambda: mesh.upstream("m1") == "pod-0", 10, "m1 loaded")
    loaded = _pushed() - before
    assert 0 < loaded < 10_000, loaded
    _commit(mesh.url, [["HDEL", st.PLACEMENTS, M1]], [(st.KIND_PLACEMENT, M1)])
    wait_for(lambda: mesh.upstream("m1") == "activator", 10, "m1 unloaded")


def test_incremental_patches_equal_a_full_build(mesh: Mesh) -> None:
    """Placement moves, an alias re-pointed to a new registered id, a new model: the patched
    snapshot equals what a fresh replica builds from the hashes."""
    m2 = "m1__isvc-2222222222"
    _commit(mesh.url, [["HSET", st.PLACEMENTS, M0, copies_to_json({"pod-0": Copy(CopyState.LOADED), "pod-1": Copy(CopyState.LOADED)})]], [(st.KIND_PLACEMENT, M0)])
    _commit(mesh.url, [["HSET", st.MODELS, m2, ModelSpec(m2, "m1", "sklearn", {}).to_json()], ["HSET", st.ALIASES, "m1", m2]],
            [(st.KIND_MODEL, m2), (st.KIND_ALIAS, "m1")])
    _commit(mesh.url, [["HSET", st.PLACEMENTS, m2, copies_to_json({"pod-1": Copy(CopyState.LOADED)})]], [(st.KIND_PLACEMENT, m2)])
    wait_for(lambda: mesh.upstream("m1") == "pod-1", 10, "m1 now names the new id")
    assert mesh.upstream(M1) == "activator"  # the old id is still registered, cold
    _check_equals_fresh(mesh)


def test_traffic_rule_follows_the_models_it_names(mesh: Mesh) -> None:
    """A TrafficRule in the scoped layout: the name's scope points at the plan's own
    RouteConfiguration; moving a model the plan splits to (a placement-only change, which
    otherwise takes the O(change) partial path) rebuilds it; removing the rule restores the
    plain route. Throughout, the patched snapshot equals a fresh full build."""
    from meshserve.rules import store as rules_store

    m3, m4 = "m3__isvc-3333333333", "m4__isvc-4444444444"
    _commit(mesh.url,
            [["HSET", st.MODELS, m, ModelSpec(m, a, "sklearn", {}).to_json()] for m, a in ((m3, "m3"), (m4, "m4"))]
            + [["HSET", st.ALIASES, "m3", m3], ["HSET", st.ALIASES, "m4", m4],
               ["HSET", st.PLACEMENTS, m3, copies_to_json({"pod-0": Copy(CopyState.LOADED)})],
               ["HSET", st.PLACEMENTS, m4, copies_to_json({"pod-1": Copy(CopyState.LOADED)})]],
            [(st.KIND_MODEL, m3), (st.KIND_MODEL, m4), (st.KIND_ALIAS, "m3"), (st.KIND_ALIAS, "m4"),
             (st.KIND_PLACEMENT, m3), (st.KIND_PLACEMENT, m4)])
    wait_for(lambda: mesh.upstream("m3") == "pod-0" and mesh.upstream("m4") == "pod-1", 10, "m3, m4 routed")
    rule = {"apiVersion": "meshserve.io/v1alpha1", "kind": "TrafficRule", "metadata": {"name": "m3-split"},
            "spec": {"model": "m3", "routes": [{"to": [{"model": "m3", "weight": 50}, {"model": "m4", "weight": 50}]}]}}
    ops, changes = rules_store.rule_ops([rule], {})
    _commit(mesh.url, ops, changes)

    def seen(n: int = 40) -> set[tuple[str, str]]:
        out = set()
        for _ in range(n):
            code, body = http(f"{mesh.rest}/v2/models/m3/infer", data=b"{}")
            assert code == 200, (code, body)
            out.add((body["upstream"], body["model"]))
        return out

    wait_for(lambda: seen() == {("pod-0", m3), ("pod-1", m4)}, 10, "m3 split over m3 and m4")
    assert mesh.infer("x", [("mm-vmodel-id", "m3")]).model_name in (m3, m4)  # gRPC by alias follows the plan
    assert mesh.infer("x", [("mm-model-id", m4)]).id == "pod-1"  # a concrete id is pinned
    assert mesh.upstream("m4") == "pod-1"  # other names keep their plain routes
    # A placement-only change to a model the plan names: the plan's routes follow it.
    _commit(mesh.url, [["HSET", st.PLACEMENTS, m4, copies_to_json({"pod-0": Copy(CopyState.LOADED)})]], [(st.KIND_PLACEMENT, m4)])
    wait_for(lambda: seen() == {("pod-0", m3), ("pod-0", m4)}, 10, "m3's split follows m4 to pod-0")
    _check_equals_fresh(mesh)
    # The rule goes: m3 routes to its own model again.
    _commit(mesh.url, [["HDEL", st.RULES, "m3-split"], ["HDEL", st.RULE_STATUS, "m3-split"]], [(st.KIND_RULE, "m3-split")])
    wait_for(lambda: seen(20) == {("pod-0", m3)}, 10, "m3 back on its own model")
    _check_equals_fresh(mesh)


def _check_equals_fresh(mesh: Mesh) -> None:
    fresh = AdsThread().start()
    state = fresh.call(_state(mesh.url))
    try:
        assert fresh.cache is not None
        src = RedisSource(mesh.settings, state, fresh.cache, layout="scoped")
        fresh.call(src.rebuild())
        wait_for(lambda: mesh.digests(mesh.ads) == mesh.digests(fresh), 5, "patched equals fresh")
    finally:
        fresh.call(state.close())
        fresh.stop()
