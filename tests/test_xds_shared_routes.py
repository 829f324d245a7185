"""Shared routes (docs/design/routing.md "Shared routes"): a loaded model's scopes name one
RouteConfiguration per pod set when every pod of it resolves names itself, and the model's own
(which rewrites the name to the id) where it must: a pod whose runtime does not (MLServer,
Triton), an alias two models with a copy on one pod share (a rollout), an alias the id was not
made for, per-model route stats.

Kind: the layout is pure (the first tests); the last drives the production RedisSource on a real
Valkey through a rollout and checks every patched snapshot against a fresh full build."""

from __future__ import annotations

from typing import Any

from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve.store import State, keys, ops
from meshserve.store.messages import KIND_ALIAS, KIND_ALL, KIND_PLACEMENT, KIND_POD
from meshserve_xds import resources as r
from meshserve_xds import scoped, scoped_routes
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.clusters import pod_cluster
from meshserve_xds.source import RedisSource

E = r.Endpoint("127.0.0.1", 1, 2)
ACT = r.Endpoint("127.0.0.1", 9, 10)
A1, A2, B1, C1 = "a__isvc-0000000001", "a__isvc-0000000002", "b__isvc-0000000001", "c__isvc-0000000001"


def _state(**kw: Any) -> r.RoutingState:
    s = r.RoutingState(
        pods={p: E for p in ("p0", "p1", "p2")}, loaded={A1: ["p0"], B1: ["p2"], C1: ["p0", "p1"]},
        aliases={"a": A1, "b": B1, "c": C1}, activator=ACT, registered={A1, B1, C1},
        resolving={"p0", "p1"}, shared_routes=True,
    )
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_names_resolved_by_the_pods_share_their_pod_sets_routes() -> None:
    s = _state()
    t = scoped_routes.scope_targets(s)
    assert t["a"] == t[A1] == "pods/p0" and t["c"] == t[C1] == "pods/p0+p1"
    assert t["b"] == t[B1] == f"model/{B1}"  # p2's runtime needs the id in the path
    routes = scoped.build_all(s, r.ListenerConfig()).by_type[r.ROUTE_TYPE]
    assert set(routes) == {"activator", "pods/p0", "pods/p0+p1", f"model/{B1}"}
    vh = routes["pods/p0"].virtual_hosts[0]
    assert not any(rt.route.HasField("regex_rewrite") for rt in vh.routes)  # the path keeps the client's name
    header = vh.request_headers_to_add[0].header
    assert (header.key, header.value) == (r.MODEL_ID_HEADER, "%REQ(x-ms-model)%")  # the name the scope was picked by
    assert [rt.route.cluster for rt in vh.routes] == [pod_cluster("p0", "grpc"), pod_cluster("p0", "rest")]


def test_off_by_setting_or_with_route_stats() -> None:
    for s in (_state(shared_routes=False), _state(route_stats=True)):
        t = scoped_routes.scope_targets(s)
        assert t["a"] == t[A1] == f"model/{A1}" and t["c"] == f"model/{C1}"


def test_an_alias_two_models_hold_on_a_pod_is_rewritten_to_its_target() -> None:
    """A rollout: the new version has a copy on the old one's pod (loading, loaded or unloading):
    the runtime there would serve the one it loaded first, so the alias names its target's own
    RouteConfiguration. The ids still share; elsewhere the alias shares again."""
    s = _state(loaded={A1: ["p0"], A2: ["p0"]}, aliases={"a": A2}, registered={A1, A2},
               contested={"a": {A1: ("p0",), A2: ("p0",)}})
    t = scoped_routes.scope_targets(s)
    assert t["a"] == f"model/{A2}" and t[A1] == t[A2] == "pods/p0"
    s = _state(loaded={A1: ["p1"], A2: ["p0"]}, aliases={"a": A2}, registered={A1, A2},
               contested={"a": {A1: ("p1",), A2: ("p0",)}})
    assert scoped_routes.scope_targets(s)["a"] == "pods/p0"  # no other version on p0


def test_an_alias_the_id_was_not_made_for_is_rewritten() -> None:
    s = _state(aliases={"other": A1}, loaded={A1: ["p0"]}, registered={A1})
    t = scoped_routes.scope_targets(s)
    assert t["other"] == f"model/{A1}" and t[A1] == "pods/p0"


SETTINGS = dict(gateway_rest_port=0, gateway_grpc_port=0)


async def _publish_step(st: State, src: RedisSource, last: bytes, cmds: list[list[Any]], changes: list[tuple[str, str]]) -> bytes:
    await st.commit(cmds, changes)
    entries = await ops.read_changes(st.r, last, count=1000)
    await src.apply(entries)
    return entries[-1][0]


async def _fresh(st: State, settings: Settings) -> SnapshotCache:
    c = SnapshotCache()
    src = RedisSource(settings, st, c, layout="scoped")
    await src.rebuild()
    return c


def _digests(c: SnapshotCache) -> dict[str, dict[str, bytes]]:
    g = c.group(r.GATEWAY_GROUP)
    return {t: dict(g.types[t].digests) for t in (r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE, r.CLUSTER_TYPE, r.ENDPOINT_TYPE)}


def _scope(c: SnapshotCache, name: str) -> Any:
    from envoy.config.route.v3 import scoped_route_pb2

    return scoped_route_pb2.ScopedRouteConfiguration.FromString(c.group(r.GATEWAY_GROUP).types[r.SCOPED_ROUTE_TYPE].resources[f"scope/{name}"])


async def test_a_rollout_through_the_source_patches_what_a_full_build_gives(state: State) -> None:
    """Old version on p0; the new one loads there, the alias moves, the old one unloads; a move
    off a copy set; a pod re-registered with a runtime that resolves names. After each step the
    patched snapshot equals a fresh build from the hashes, and the alias names what it must."""
    settings = Settings(redis_url="", **SETTINGS)
    pods = [Pod("p0", "127.0.0.1", 1, 2, 1 << 30, resolves_names=True), Pod("p1", "127.0.0.1", 3, 4, 1 << 30, resolves_names=True),
            Pod("p2", "127.0.0.1", 5, 6, 1 << 30)]
    loaded = Copy(CopyState.LOADED)
    await state.commit(
        [["HSET", keys.PODS, p.id, p.to_json()] for p in pods]
        + [["HSET", keys.MODELS, m, ModelSpec(m, m.split("__")[0], "sklearn", {}).to_json()] for m in (A1, A2, B1, C1)]
        + [["HSET", keys.ALIASES, "a", A1], ["HSET", keys.ALIASES, "b", B1], ["HSET", keys.ALIASES, "c", C1],
           ["HSET", keys.PLACEMENTS, A1, copies_to_json({"p0": loaded})], ["HSET", keys.PLACEMENTS, B1, copies_to_json({"p2": loaded})],
           ["HSET", keys.PLACEMENTS, C1, copies_to_json({"p0": loaded, "p1": loaded})]],
        [(KIND_ALL, "")],
    )
    cache = SnapshotCache()
    src = RedisSource(settings, state, cache, layout="scoped")
    last = await state.last_change_id()
    await src.rebuild()
    assert _scope(cache, "a").route_configuration_name == "pods/p0" and _scope(cache, "b").route_configuration_name == f"model/{B1}"
    steps: list[tuple[list[list[Any]], list[tuple[str, str]], dict[str, str]]] = [
        # the new version starts loading beside the old: the alias is pinned to the old one's id
        ([["HSET", keys.PLACEMENTS, A2, copies_to_json({"p0": Copy(CopyState.LOADING)})]], [(KIND_PLACEMENT, A2)],
         {"a": f"model/{A1}", A1: "pods/p0"}),
        ([["HSET", keys.PLACEMENTS, A2, copies_to_json({"p0": loaded})]], [(KIND_PLACEMENT, A2)], {"a": f"model/{A1}", A2: "pods/p0"}),
        ([["HSET", keys.ALIASES, "a", A2]], [(KIND_ALIAS, "a")], {"a": f"model/{A2}"}),
        ([["HSET", keys.PLACEMENTS, A1, copies_to_json({"p0": Copy(CopyState.UNLOADING)})]], [(KIND_PLACEMENT, A1)],
         {"a": f"model/{A2}", A1: "activator"}),
        ([["HDEL", keys.PLACEMENTS, A1]], [(KIND_PLACEMENT, A1)], {"a": "pods/p0", A1: "activator"}),
        ([["HSET", keys.PLACEMENTS, C1, copies_to_json({"p1": loaded})]], [(KIND_PLACEMENT, C1)], {"c": "pods/p1", C1: "pods/p1"}),
        ([["HSET", keys.PLACEMENTS, B1, copies_to_json({"p1": loaded})]], [(KIND_PLACEMENT, B1)], {"b": "pods/p1"}),
        ([["HSET", keys.PLACEMENTS, B1, copies_to_json({"p2": loaded})]], [(KIND_PLACEMENT, B1)], {"b": f"model/{B1}"}),
        ([["HSET", keys.PODS, "p2", Pod("p2", "127.0.0.1", 5, 6, 1 << 30, resolves_names=True).to_json()]], [(KIND_POD, "p2")],
         {"b": "pods/p2", B1: "pods/p2"}),
        ([["HDEL", keys.PLACEMENTS, B1], ["HDEL", keys.PLACEMENTS, C1]], [(KIND_PLACEMENT, B1), (KIND_PLACEMENT, C1)],
         {"b": "activator", "c": "activator"}),
    ]
    whole = []
    publish = src._publish
    src._publish = lambda: (whole.append(1), publish())[1]  # type: ignore[method-assign]
    for i, (cmds, changes, want) in enumerate(steps):
        whole.clear()
        last = await _publish_step(state, src, last, cmds, changes)
        # O(change): only a pod's change takes the whole state
        assert bool(whole) == any(k == KIND_POD for k, _ in changes), i
        got = {n: _scope(cache, n).route_configuration_name for n in want}
        assert got == want, (i, got)
        assert _digests(cache) == _digests(await _fresh(state, settings)), i
        routes = set(cache.group(r.GATEWAY_GROUP).types[r.ROUTE_TYPE].resources)
        named = {_scope(cache, n).route_configuration_name for n in ("a", "b", "c", A1, A2, B1, C1)}
        assert {x for x in routes if x.startswith(("model/", "pods/"))} == {x for x in named if x.startswith(("model/", "pods/"))}, i
