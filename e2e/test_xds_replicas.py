"""Issue 3: several stateless xDS replicas against one Redis serve the same config.

Kind: e2e. A real Valkey, two in-process xDS replicas (RedisSource + cache + ADS server, each on
its own event loop thread) and two real Envoys, one per replica. Routing state is written to
Redis through `State.commit`, as placement writes it.
"""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest

from meshserve_testing import devmesh
from meshserve.store import State, keys
from meshserve.store.messages import KIND_ALIAS, KIND_PLACEMENT, KIND_POD
from meshserve.model import Copy, CopyState, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_xds import clusters
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy, http, model_route_clusters, wait_for
from meshserve_xds.layout import gateway_layout
from meshserve_xds.server import GATEWAY_GROUP
from meshserve_xds.source import RedisSource

pytestmark = pytest.mark.e2e

M0 = "m0__isvc-0000000000"


class Replica:
    def __init__(self, settings: Settings):
        self.ads = AdsThread().start()
        self.state = self.ads.call(_make_state(settings.redis_url))
        assert self.ads.cache is not None
        self.source = RedisSource(settings, self.state, self.ads.cache)
        self.task = asyncio.run_coroutine_threadsafe(self.source.run(), self.ads.loop)

    def snapshot(self) -> dict[str, tuple[str, dict[str, bytes]]]:
        assert self.ads.cache is not None
        g = self.ads.run(lambda: self.ads.cache.group(GATEWAY_GROUP))  # type: ignore[union-attr]
        return {t: (s.version, dict(s.resources)) for t, s in g.types.items()}

    def stop(self) -> None:
        self.task.cancel()
        self.ads.call(self.state.close())
        self.ads.stop()


async def _make_state(url: str) -> State:
    return State.from_url(url)


@pytest.fixture(scope="module")
def store() -> Iterator[devmesh.Valkey]:
    with devmesh.valkey() as v:
        yield v


def _commit(url: str, ops: list[list[object]], changes: list[tuple[str, str]]) -> None:
    async def go() -> None:
        s = State.from_url(url)
        try:
            await s.commit(ops, changes)
        finally:
            await s.close()

    asyncio.run(go())


def test_two_replicas_serve_identical_config(store: devmesh.Valkey) -> None:
    with Upstream("pod-a") as pod_a, Upstream("pod-b") as pod_b, Upstream("activator") as act:
        pods = {
            "pod-a": Pod("pod-a", "127.0.0.1", pod_a.port, pod_a.port, 1 << 30),
            "pod-b": Pod("pod-b", "127.0.0.1", pod_b.port, pod_b.port, 1 << 30),
        }
        _commit(
            store.url,
            [["HSET", keys.PODS, p.id, p.to_json()] for p in pods.values()]
            + [["HSET", keys.ALIASES, "m0", M0], ["HSET", keys.PLACEMENTS, M0, copies_to_json({"pod-a": Copy(CopyState.LOADED)})]],
            [(KIND_POD, "pod-a"), (KIND_POD, "pod-b"), (KIND_ALIAS, "m0"), (KIND_PLACEMENT, M0)],
        )
        rest_ports = [0, 0]  # Envoy binds free listener ports; read back from its admin API
        replicas = []
        try:
            for port in rest_ports:
                s = Settings(
                    redis_url=store.url, gateway_rest_port=port, gateway_grpc_port=0,
                    activator_rest_port=act.port, activator_grpc_port=act.port,
                )
                replicas.append(Replica(s))
            admins = [0, 0]  # Envoy binds any free admin port; the harness reads it back
            # Both replicas build for the same listener ports so their output can be compared byte for byte.
            for rep in replicas:
                rep.source.layout = gateway_layout("scoped", r.ListenerConfig("127.0.0.1", rest_ports[0], rest_ports[1]))
            wait_for(lambda: all(rep.snapshot() for rep in replicas), 10, "both replicas built")
            replicas[0].ads.call(replicas[0].source.rebuild())
            replicas[1].ads.call(replicas[1].source.rebuild())
            a, b = replicas[0].snapshot(), replicas[1].snapshot()
            assert a == b, "replicas differ"

            # Two Envoys, each on its own replica, each on listener ports of its own.
            boot0 = gateway_bootstrap("gw-0", "127.0.0.1", replicas[0].ads.port, admins[0])
            with envoy(boot0, admins[0]) as gw0:
                rest = f"http://127.0.0.1:{gw0.listener_port(r.REST)}"
                wait_for(lambda: http(f"{rest}/v2/models/m0/infer", data=b"{}")[1].get("upstream") == "pod-a", 20, "m0 on pod-a")
                # Move the model: both replicas follow the change stream to the same config.
                _commit(
                    store.url,
                    [["HSET", keys.PLACEMENTS, M0, copies_to_json({"pod-b": Copy(CopyState.LOADED)})]],
                    [(KIND_PLACEMENT, M0)],
                )
                wait_for(lambda: http(f"{rest}/v2/models/m0/infer", data=b"{}")[1].get("upstream") == "pod-b", 10, "m0 moved to pod-b")
                wait_for(lambda: replicas[0].snapshot() == replicas[1].snapshot(), 5, "replicas agree after the change")
                # Every route configuration the gateway holds, by name (one per listener in the
                # matcher layout; the activator's and one per loaded model in the scoped one).
                versions0 = gw0.route_versions()
                assert model_route_clusters(gw0.config_dump("dynamic_route_configs"), M0) == {clusters.pod_cluster("pod-b", "rest")}
            # The gateway fails over to the other replica: same versions, nothing new to apply.
            boot1 = gateway_bootstrap("gw-0", "127.0.0.1", replicas[1].ads.port, admins[1])
            with envoy(boot1, admins[1]) as gw1:
                rest = f"http://127.0.0.1:{gw1.listener_port(r.REST)}"
                wait_for(lambda: gw1.route_versions() == versions0, 20, "same route versions from the other replica")
                assert model_route_clusters(gw1.config_dump("dynamic_route_configs"), M0) == {clusters.pod_cluster("pod-b", "rest")}
                wait_for(lambda: http(f"{rest}/v2/models/m0/infer", data=b"{}")[1].get("upstream") == "pod-b", 10, "m0 on pod-b via replica 1")
        finally:
            for rep in replicas:
                rep.stop()


def test_incremental_follow_matches_full_rebuild_and_gap_resyncs(store: devmesh.Valkey) -> None:
    """Placement changes are applied by targeted re-reads (no resync); the result equals what a
    full read of the hashes builds. A revision gap in the stream triggers one full resync."""
    from prometheus_client import REGISTRY

    def metric(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    pods = {f"p{i}": Pod(f"p{i}", "127.0.0.1", 9000 + i, 9100 + i, 1 << 30) for i in range(3)}
    models = [f"inc{i}__isvc-{i:010x}" for i in range(50)]
    _commit(
        store.url,
        [["HSET", keys.PODS, p.id, p.to_json()] for p in pods.values()]
        + [["HSET", keys.PLACEMENTS, m, copies_to_json({f"p{i % 3}": Copy(CopyState.LOADED)})] for i, m in enumerate(models)],
        [(KIND_POD, p) for p in pods] + [(KIND_PLACEMENT, m) for m in models],
    )
    rep = Replica(Settings(redis_url=store.url, debounce_quiet_ms=5, debounce_max_ms=50))
    try:
        wait_for(lambda: rep.snapshot(), 10, "replica built")
        resyncs, incr = metric("meshserve_xds_resyncs_total"), metric("meshserve_xds_incremental_updates_total")
        # Move ten models, unload five, in separate commits.
        for i in range(10):
            _commit(store.url, [["HSET", keys.PLACEMENTS, models[i], copies_to_json({f"p{(i + 1) % 3}": Copy(CopyState.LOADED)})]], [(KIND_PLACEMENT, models[i])])
        for i in range(10, 15):
            _commit(store.url, [["HDEL", keys.PLACEMENTS, models[i]]], [(KIND_PLACEMENT, models[i])])
        rev = asyncio.run(_rev(store.url))
        wait_for(lambda: rep.source.rev == rev, 10, "replica caught up")
        assert metric("meshserve_xds_resyncs_total") == resyncs
        assert metric("meshserve_xds_incremental_updates_total") > incr
        followed = rep.snapshot()

        full = Replica(Settings(redis_url=store.url))
        try:
            wait_for(lambda: full.snapshot(), 10, "fresh replica built")
            assert full.snapshot() == followed
        finally:
            full.stop()

        # A gap: the revision moves on with no entry (as after a trimmed stream).
        resyncs = metric("meshserve_xds_resyncs_total")
        _commit(store.url, [["HSET", keys.PLACEMENTS, models[20], copies_to_json({"p2": Copy(CopyState.LOADED)})]], [])
        _commit(store.url, [["HSET", keys.PLACEMENTS, models[21], copies_to_json({"p2": Copy(CopyState.LOADED)})]], [(KIND_PLACEMENT, models[21])])
        rev = asyncio.run(_rev(store.url))
        wait_for(lambda: rep.source.rev == rev, 10, "replica resynced")
        assert metric("meshserve_xds_resyncs_total") == resyncs + 1
        assert rep.source.snap is not None and list(rep.source.snap.placements[models[20]]) == ["p2"]
    finally:
        rep.stop()


async def _rev(url: str) -> int:
    s = State.from_url(url)
    try:
        return await s.rev()
    finally:
        await s.close()
