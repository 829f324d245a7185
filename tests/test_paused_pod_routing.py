"""A pod placement judged paused (its runtime accepts connections and answers nothing) stops
taking its copy sets' traffic while another copy answers, and takes it again when it is no
longer paused; a model only it holds keeps routing to it.

Kind: the cluster build and the verdict are pure (the first tests); the last drives the
production RedisSource on a real Valkey through the leader's commits (ops.set_paused,
ops.clear_paused, ops.withdraw_pod) and reads the gateway's endpoints from its cache."""

from __future__ import annotations

import asyncio
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2

from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve.store import State, keys, ops
from meshserve.store.messages import KIND_ALL, KIND_PAUSED, Change
from meshserve_placement.liveness import ANSWERED, Probe, judge
from meshserve_xds import proxyless
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.clusters import build_clusters, copies_cluster, pod_cluster
from meshserve_xds.source import RedisSource, plan_batch

ACT = r.Endpoint("127.0.0.1", 9, 10)
M2, M1 = "two__isvc-0000000001", "one__isvc-0000000001"


def _ports(assignment: Any) -> list[int]:
    if isinstance(assignment, bytes):
        assignment = endpoint_pb2.ClusterLoadAssignment.FromString(assignment)
    return sorted(e.endpoint.address.socket_address.port_value for g in assignment.endpoints for e in g.lb_endpoints)


def _state(paused: set[str]) -> r.RoutingState:
    pods = {p: r.Endpoint("127.0.0.1", rest, rest + 1, p in paused) for p, rest in (("p0", 100), ("p1", 200))}
    return r.RoutingState(pods=pods, loaded={M2: ["p0", "p1"], M1: ["p1"]}, aliases={"two": M2, "one": M1}, activator=ACT,
                          registered={M1, M2})


def test_a_paused_pod_leaves_its_copy_sets_but_keeps_its_own_cluster() -> None:
    _, eps = build_clusters(_state({"p1"}))
    assert _ports(eps[copies_cluster(["p0", "p1"], "rest")]) == [100]
    assert _ports(eps[copies_cluster(["p0", "p1"], "grpc")]) == [101]
    assert _ports(eps[pod_cluster("p1", "rest")]) == [200]  # "one" is only there: it still routes
    _, eps = build_clusters(_state(set()))
    assert _ports(eps[copies_cluster(["p0", "p1"], "rest")]) == [100, 200]


def test_a_copy_set_whose_pods_are_all_paused_keeps_them_all() -> None:
    """Nowhere better to send it: the requests wait for a pod to resume, as before."""
    _, eps = build_clusters(_state({"p0", "p1"}))
    assert _ports(eps[copies_cluster(["p0", "p1"], "rest")]) == [100, 200]


def test_proxyless_clients_skip_a_paused_copy_too() -> None:
    def route(paused: set[str]) -> Any:
        routes = proxyless.build_routes(_state(paused)).virtual_hosts[0].routes
        return next(rt.route for rt in routes if rt.match.headers and rt.match.headers[0].string_match.exact == M2)

    assert route({"p0"}).cluster == pod_cluster("p1", "grpc")
    assert {c.name for c in route(set()).weighted_clusters.clusters} == {pod_cluster("p0", "grpc"), pod_cluster("p1", "grpc")}


def test_only_a_silent_runtime_that_accepts_connections_is_paused() -> None:
    accepted = Probe("connection accepted, no answer within 0.5s", accepted=True)
    assert judge(103.0, 100.0, 1.0, 2, accepted, 30.0, 10.0).paused
    assert not judge(103.0, 100.0, 1.0, 2, ANSWERED, 30.0, 10.0).paused  # a stalled loader: its runtime serves
    assert not judge(101.0, 100.0, 1.0, 2, accepted, 30.0, 10.0).paused  # heartbeat fresh


def test_a_paused_change_is_followed_without_a_resync() -> None:
    b = plan_batch(4, [(b"5-0", Change(5, KIND_PAUSED, "p1"))])
    assert not b.resync and b.ids == {KIND_PAUSED: {"p1"}}


async def _step(st: State, src: RedisSource, last: bytes, cmds: list[Any], changes: list[tuple[str, str]]) -> bytes:
    await st.commit(cmds, changes)
    entries = await ops.read_changes(st.r, last, count=1000)
    await src.apply(entries)
    return entries[-1][0]


async def test_the_gateway_follows_the_leaders_paused_marks(state: State) -> None:
    settings = Settings(redis_url="", gateway_rest_port=0, gateway_grpc_port=0)
    loaded = Copy(CopyState.LOADED)
    await state.commit(
        [["HSET", keys.PODS, p.id, p.to_json()] for p in (Pod("p0", "127.0.0.1", 100, 101, 1 << 30), Pod("p1", "127.0.0.1", 200, 201, 1 << 30))]
        + [["HSET", keys.MODELS, m, ModelSpec(m, m.split("__")[0], "sklearn", {}).to_json()] for m in (M1, M2)]
        + [["HSET", keys.ALIASES, "two", M2], ["HSET", keys.ALIASES, "one", M1],
           ["HSET", keys.PLACEMENTS, M2, copies_to_json({"p0": loaded, "p1": loaded})],
           ["HSET", keys.PLACEMENTS, M1, copies_to_json({"p1": loaded})]],
        [(KIND_ALL, "")],
    )
    cache = SnapshotCache()
    src = RedisSource(settings, state, cache, layout="scoped")
    last = await state.last_change_id()
    await src.rebuild()
    endpoints = lambda: cache.group(r.GATEWAY_GROUP).types[r.ENDPOINT_TYPE].resources  # noqa: E731
    pair = copies_cluster(["p0", "p1"], "rest")
    assert _ports(endpoints()[pair]) == [100, 200]

    last = await _step(state, src, last, [ops.set_paused("p1", "silent")], [(KIND_PAUSED, "p1")])
    assert _ports(endpoints()[pair]) == [100]
    assert _ports(endpoints()[pod_cluster("p1", "rest")]) == [200]
    # A fresh gateway (or a resync) reads the same from the hash.
    fresh = SnapshotCache()
    await RedisSource(settings, state, fresh, layout="scoped").rebuild()
    assert _ports(fresh.group(r.GATEWAY_GROUP).types[r.ENDPOINT_TYPE].resources[pair]) == [100]

    last = await _step(state, src, last, [ops.clear_paused(["p1"])], [(KIND_PAUSED, "p1")])
    assert _ports(endpoints()[pair]) == [100, 200]
    assert await ops.read_paused(state.r) == {}

    # Withdrawn while paused: the mark goes with the pod.
    await _step(state, src, last, [ops.set_paused("p1", "silent")], [(KIND_PAUSED, "p1")])
    assert await ops.read_paused(state.r) == {"p1": "silent"}
    await state.commit(ops.withdraw_pod("p1", {"reason": "gone"}), [])
    assert await ops.read_paused(state.r) == {}


async def test_a_new_leader_clears_the_marks_of_pods_no_longer_paused(state: State) -> None:
    """The leader commits only what changed, and after taking over (its marks unknown, None)
    reads the previous leader's first: a pod marked then and answering now is cleared."""
    from meshserve_placement.pods import Pods

    class Leader(Pods):
        def __init__(self) -> None:
            self.state, self.paused, self.commits = state, None, []
            self.view = type("View", (), {"pods": {}})()

        async def _commit(self, ops_: Any, changes: Any) -> None:
            self.commits.append(list(changes))
            await state.commit(ops_, changes)

    await state.commit([ops.set_paused("p0", "old"), ops.set_paused("p1", "old")], [(KIND_PAUSED, "p0"), (KIND_PAUSED, "p1")])
    lead = Leader()
    await lead._mark_paused({"p1": "still silent", "p2": "silent"})
    assert await ops.read_paused(state.r) == {"p1": "old", "p2": "silent"}
    assert sorted(lead.commits[0]) == [(KIND_PAUSED, "p0"), (KIND_PAUSED, "p2")]
    await lead._mark_paused({"p1": "x", "p2": "y"})
    assert len(lead.commits) == 1  # nothing changed: no commit, no gateway rebuild
    await lead._mark_paused({})
    assert await ops.read_paused(state.r) == {} and lead.paused == {}


async def test_the_activator_forwards_to_a_copy_that_answers(state: State) -> None:
    """A request the activator forwards (no route at the gateway yet, a cold request whose
    model turned out loaded) goes to a copy on a pod that is not marked paused, while there is
    one; the mark is read again after a `paused` change."""
    from meshserve_placement.activator import Activator

    act = Activator(Settings(redis_url=""), state)
    await state.commit([ops.set_paused("p0", "silent")], [(KIND_PAUSED, "p0")])
    assert {tuple(await act._answering(["p0", "p1"])) for _ in range(20)} == {("p1",)}
    assert await act._answering(["p0"]) == ["p0"]  # nowhere else to go
    watch = asyncio.create_task(act.watch_changes())
    try:
        await asyncio.sleep(0.2)  # it reads from the stream's end: the change below comes after
        await state.commit([ops.clear_paused(["p0"])], [(KIND_PAUSED, "p0")])
        for _ in range(100):
            if act._paused is None:
                break
            await asyncio.sleep(0.02)
    finally:
        watch.cancel()
    assert await act._answering(["p0", "p1"]) == ["p0", "p1"]


def test_a_pod_joins_the_leaders_view_not_paused() -> None:
    """The view's pods start unpaused whatever they run (a positional field once made every
    registered pod look paused to the copy reconcile: its runtime's name in that slot)."""
    from meshserve_placement.reload import _pod_view

    pv = _pod_view(Pod("p0", "127.0.0.1", 1, 2, 1 << 30, formats=["sklearn"], runtime="builtin", max_loading=3, draining=True), -1.0)
    assert (pv.paused, pv.runtime, pv.max_loading, pv.draining, pv.formats) == (False, "builtin", 3, True, ["sklearn"])
