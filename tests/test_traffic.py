"""Kind: unit (pure rendering of traffic plans) plus checks by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from meshserve.rules.plan import Branch, HeaderMatch, Plan
from meshserve_xds import matcher, scoped_routes
from meshserve_xds import resources as r
from meshserve_xds import scoped

STABLE = "m__isvc-aaaaaaaaaa"
CANARY = "m2__isvc-bbbbbbbbbb"
SHADOW = "m3__isvc-cccccccccc"


def state(traffic: dict, loaded: dict | None = None) -> r.RoutingState:
    pods = {f"pod-{i}": r.Endpoint("127.0.0.1", 9000 + i, 9100 + i) for i in range(2)}
    return r.RoutingState(
        pods=pods,
        loaded=loaded if loaded is not None else {STABLE: ["pod-0", "pod-1"], CANARY: ["pod-0"], SHADOW: ["pod-1"]},
        aliases={"m": STABLE, "m2": CANARY, "m3": SHADOW},
        activator=r.Endpoint("127.0.0.1", 8500, 8501),
        traffic=traffic,
    )


def full_plan() -> Plan:
    return Plan(
        name="m",
        branches=[
            Branch(((CANARY, 100),), (HeaderMatch("x-user-group", "exact", "beta"),)),
            Branch(((STABLE, 90), (CANARY, 10)), sticky_header="x-user-id"),
        ],
        mirror=(SHADOW, 10.0),
    )


def _entry(cfg, path: str):  # the matcher-tree entry REST requests for `path` land on
    tree = cfg.virtual_hosts[0].matcher
    if path in tree.matcher_tree.exact_match_map.map:
        return tree.matcher_tree.exact_match_map.map[path]
    return tree.on_no_match.matcher.matcher_tree.prefix_match_map.map[path]


def _unpack(on_match) -> list[rc.Route]:
    cfg = on_match.action.typed_config
    if cfg.Is(rc.RouteList.DESCRIPTOR):
        rl = rc.RouteList()
        cfg.Unpack(rl)
        return list(rl.routes)
    route = rc.Route()
    cfg.Unpack(route)
    return [route]


def test_split_sets_model_header_per_weighted_cluster() -> None:
    plan = Plan(name="m", branches=[Branch(((STABLE, 90), (CANARY, 10)))])
    routes = _unpack(_entry(matcher.build_rest_routes(state({"m": plan})), "/v2/models/m/"))
    assert len(routes) == 1
    wc = routes[0].route.weighted_clusters.clusters
    got = {(c.name, c.request_headers_to_add[0].header.value): c.weight.value for c in wc}
    # 90% over two pods, 10% on one: integer weights keep the exact ratio.
    # The stable model's two copies are one copy-set cluster (a retry reaches the other copy).
    assert got == {("pods_pod-0+pod-1_rest", STABLE): 90000, ("pod_pod-0_rest", CANARY): 10000}
    assert not routes[0].route.prefix_rewrite  # the path cannot be rewritten per cluster; mm-model-id picks the model


def test_header_branch_then_default_in_order() -> None:
    routes = _unpack(_entry(matcher.build_rest_routes(state({"m": full_plan()})), "/v2/models/m/"))
    assert [len(x.match.headers) for x in routes] == [1, 0]
    assert routes[0].match.headers[0].string_match.exact == "beta"
    assert routes[0].route.prefix_rewrite == f"/v2/models/{CANARY}/"  # single target keeps the rewrite
    assert routes[0].request_headers_to_add[0].header.value == CANARY
    assert routes[1].route.weighted_clusters.use_hash_policy.value
    assert routes[1].route.hash_policy[0].header.header_name == "x-user-id"
    mirrors = routes[1].route.request_mirror_policies
    assert [(m.cluster, m.runtime_fraction.default_value.numerator) for m in mirrors] == [("pod_pod-1_rest", 1000)]
    assert mirrors[0].request_headers_mutations[0].append.header.value == SHADOW


def test_unloaded_target_goes_to_activator_with_its_id() -> None:
    plan = Plan(name="m", branches=[Branch(((STABLE, 50), (CANARY, 50)))])
    routes = _unpack(_entry(matcher.build_rest_routes(state({"m": plan}, loaded={STABLE: ["pod-0"]})), "/v2/models/m/"))
    got = {c.name: c.request_headers_to_add[0].header.value for c in routes[0].route.weighted_clusters.clusters}
    assert got == {"pod_pod-0_rest": STABLE, r.ACTIVATOR_REST: CANARY}


def test_grpc_alias_entry_follows_the_plan() -> None:
    cfg = matcher.build_grpc_routes(state({"m": full_plan()}))
    by_alias = cfg.virtual_hosts[0].matcher.on_no_match.matcher.matcher_tree.exact_match_map.map
    routes = _unpack(by_alias["m"])
    assert routes[1].route.weighted_clusters.clusters[0].name.endswith("_grpc")


def test_no_plans_means_unchanged_routes() -> None:
    s = state({})
    assert matcher.build_rest_routes(s) == matcher.build_rest_routes(state({}))
    assert not s.traffic


def _static_bootstrap(res: r.Resources) -> dict:
    b = bootstrap_pb2.Bootstrap()
    for name, lst in res.by_type[r.LISTENER_TYPE].items():
        l2 = type(lst)()
        l2.CopyFrom(lst)
        m = hcm.HttpConnectionManager()
        l2.filter_chains[0].filters[0].typed_config.Unpack(m)
        m.ClearField("rds")
        m.route_config.CopyFrom(res.by_type[r.ROUTE_TYPE][name])
        l2.filter_chains[0].filters[0].typed_config.Pack(m)
        b.static_resources.listeners.append(l2)
    for name, c in res.by_type[r.CLUSTER_TYPE].items():
        c2 = cluster_pb2.Cluster()
        c2.CopyFrom(c)
        c2.ClearField("eds_cluster_config")
        c2.type = cluster_pb2.Cluster.STATIC
        c2.load_assignment.CopyFrom(res.by_type[r.ENDPOINT_TYPE][name])
        b.static_resources.clusters.append(c2)
    return json_format.MessageToDict(b)


def test_real_envoy_accepts_every_rule_shape(tmp_path: Path) -> None:
    plans = {
        "m": full_plan(),
        "m2": Plan(name="m2", branches=[Branch(((CANARY, 100),), (HeaderMatch("x-a", "regex", "^b.*"), HeaderMatch("x-b", "present", True))),
                                        Branch(((CANARY, 95), (STABLE, 5)))], mirror=(STABLE, 0.5)),
        "m3": Plan(name="m3", branches=[Branch(((SHADOW, 70), (STABLE, 30)))]),  # one target unloaded below
    }
    for i, loaded in enumerate((None, {STABLE: ["pod-0"]})):
        f = tmp_path / f"b{i}.json"
        f.write_text(json.dumps(_static_bootstrap(matcher.build_all(state(plans, loaded), r.ListenerConfig(rest_port=1, grpc_port=2)))))
        envoy = Path(sys.executable).with_name("envoy")
        out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stderr[-2000:]


# The scoped layout (the production default): each name with a plan gets its own RouteConfiguration.


def scoped_state(traffic: dict, loaded: dict | None = None) -> r.RoutingState:
    s = state(traffic, loaded)
    s.registered = {STABLE, CANARY, SHADOW}
    return s


def _rc_routes(res: r.Resources, name: str) -> list[rc.Route]:
    return list(res.by_type[r.ROUTE_TYPE][name].virtual_hosts[0].routes)


def test_scoped_plan_gets_its_own_route_configuration() -> None:
    res = scoped.build_all(scoped_state({"m": full_plan()}), r.ListenerConfig())
    targets = {s.key.fragments[0].string_key: s.route_configuration_name for s in res.by_type[r.SCOPED_ROUTE_TYPE].values()}
    assert targets["m"] == "traffic/m"
    assert targets[STABLE] == f"model/{STABLE}" and targets["m2"] == f"model/{CANARY}"  # ids and other names untouched
    routes = _rc_routes(res, "traffic/m")
    rest = [x for x in routes if x.match.prefix == "/v2/models/m"]
    grpc = [x for x in routes if x.match.prefix == r.GRPC_PREFIX]
    assert [len(x.match.headers) for x in rest] == [1, 0] and [len(x.match.headers) for x in grpc] == [1, 0]
    assert rest[0].route.prefix_rewrite == f"/v2/models/{CANARY}"  # single target: rewritten to its id
    assert rest[0].request_headers_to_add[0].header.value == CANARY
    wc = rest[1].route.weighted_clusters
    got = {(c.name, c.request_headers_to_add[0].header.value): c.weight.value for c in wc.clusters}
    # The stable model's two copies are one copy-set cluster (a retry reaches the other copy).
    assert got == {("pods_pod-0+pod-1_rest", STABLE): 90000, ("pod_pod-0_rest", CANARY): 10000}
    assert not rest[1].route.prefix_rewrite and wc.use_hash_policy.value
    assert rest[1].route.hash_policy[0].header.header_name == "x-user-id"
    assert [m.cluster for m in rest[1].route.request_mirror_policies] == ["pod_pod-1_rest"]
    assert grpc[1].route.weighted_clusters.clusters[0].name.endswith("_grpc") and not grpc[1].route.prefix_rewrite
    assert routes[-1].match.prefix == "/" and routes[-1].route.cluster == r.ACTIVATOR_REST


def test_scoped_plan_on_a_concrete_id_keeps_mm_model_id_pinned() -> None:
    plan = Plan(name=STABLE, branches=[Branch(((STABLE, 50), (CANARY, 50)))])
    routes = _rc_routes(scoped.build_all(scoped_state({STABLE: plan}), r.ListenerConfig()), f"traffic/{STABLE}")
    assert routes[0].match.headers[0].name == r.MODEL_ID_HEADER and routes[0].match.headers[0].string_match.exact == STABLE
    assert routes[0].route.cluster == "pods_pod-0+pod-1_grpc"  # its two copies' set


def test_scoped_diff_follows_plans_and_the_models_they_name() -> None:
    s = scoped_state({})
    idx = scoped.index(s)
    # A plan appears: its scope re-points and its RouteConfiguration is added.
    s.traffic = {"m": full_plan()}
    p, idx = scoped.diff(idx, s)
    assert set(p.upserts[r.SCOPED_ROUTE_TYPE]) == {"scope/m"} and "traffic/m" in p.upserts[r.ROUTE_TYPE]
    assert scoped.involves_traffic(idx, {SHADOW}, set()) and scoped.involves_traffic(idx, set(), {"m"})
    assert not scoped.involves_traffic(idx, set(), {"m2"})
    # Nothing changed: nothing but the (unchanged) activator is re-sent.
    p, idx = scoped.diff(idx, s)
    assert set(p.upserts[r.ROUTE_TYPE]) == {scoped_routes.ACTIVATOR_RC} and not p.upserts[r.SCOPED_ROUTE_TYPE]
    # The mirror's model moves: the plan's RouteConfiguration is rebuilt with it.
    s.loaded[SHADOW] = ["pod-0"]
    p, idx = scoped.diff(idx, s)
    assert {"traffic/m", f"model/{SHADOW}"} <= set(p.upserts[r.ROUTE_TYPE])
    mirrors = [m.cluster for x in p.upserts[r.ROUTE_TYPE]["traffic/m"].virtual_hosts[0].routes for m in x.route.request_mirror_policies]
    assert set(mirrors) == {"pod_pod-0_rest", "pod_pod-0_grpc"}
    # The plan goes: the scope returns to the model's own routes and the plan's are removed.
    s.traffic = {}
    p, idx = scoped.diff(idx, s)
    assert p.upserts[r.SCOPED_ROUTE_TYPE]["scope/m"].route_configuration_name == f"model/{STABLE}"
    assert "traffic/m" in p.removes[r.ROUTE_TYPE] and not idx.plans_of


def test_scoped_diff_equals_a_full_build() -> None:
    """Applying diffs from an empty state reaches exactly what build_all gives."""
    steps = [scoped_state({}), scoped_state({"m": full_plan()}), scoped_state({"m": full_plan()}, loaded={STABLE: ["pod-1"]}),
             scoped_state({"m3": Plan(name="m3", branches=[Branch(((SHADOW, 70), (STABLE, 30)))])})]
    held: dict[str, dict[str, object]] = {}
    idx = scoped.Index()
    for s in steps:
        p, idx = scoped.diff(idx, s)
        for t in (r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE):
            held.setdefault(t, {}).update(p.upserts.get(t, {}))
            for n in p.removes.get(t, []):
                held[t].pop(n)
        full = scoped.build_all(s, r.ListenerConfig())
        for t in (r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE):
            assert held[t] == full.by_type[t], t


def _static_scoped_bootstrap(res: r.Resources) -> dict:
    """The scoped resources with every scope and RouteConfiguration inlined, for --mode validate."""
    b = json_format.ParseDict(_static_bootstrap_clusters(res), bootstrap_pb2.Bootstrap())
    rcs = res.by_type[r.ROUTE_TYPE]
    for lst in res.by_type[r.LISTENER_TYPE].values():
        l2 = type(lst)()
        l2.CopyFrom(lst)
        m = hcm.HttpConnectionManager()
        l2.filter_chains[0].filters[0].typed_config.Unpack(m)
        m.scoped_routes.ClearField("scoped_rds")
        for sc in res.by_type[r.SCOPED_ROUTE_TYPE].values():
            inline = m.scoped_routes.scoped_route_configurations_list.scoped_route_configurations.add()
            inline.CopyFrom(sc)
            inline.ClearField("route_configuration_name")
            inline.route_configuration.CopyFrom(rcs[sc.route_configuration_name])
        l2.filter_chains[0].filters[0].typed_config.Pack(m)
        b.static_resources.listeners.append(l2)
    return json_format.MessageToDict(b)


def _static_bootstrap_clusters(res: r.Resources) -> dict:
    only = r.Resources(by_type={**res.by_type, r.LISTENER_TYPE: {}})
    return _static_bootstrap(only)


def _validate(tmp_path: Path, name: str, doc: dict) -> None:
    f = tmp_path / name
    f.write_text(json.dumps(doc))
    envoy = Path(sys.executable).with_name("envoy")
    out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stderr[-2000:]


def test_real_envoy_accepts_every_rule_shape_in_the_scoped_layout(tmp_path: Path) -> None:
    plans = {
        "m": full_plan(),
        "m2": Plan(name="m2", branches=[Branch(((CANARY, 100),), (HeaderMatch("x-a", "regex", "^b.*"), HeaderMatch("x-b", "present", True))),
                                        Branch(((CANARY, 95), (STABLE, 5)))], mirror=(STABLE, 0.5)),
        "m3": Plan(name="m3", branches=[Branch(((SHADOW, 70), (STABLE, 30)))]),  # one target unloaded below
        STABLE: Plan(name=STABLE, branches=[Branch(((STABLE, 60), (CANARY, 40)), (HeaderMatch("x-c", "prefix", "a"),)),
                                             Branch(((STABLE, 100),))], mirror=(SHADOW, 100.0)),  # a plan on a concrete id
    }
    for i, loaded in enumerate((None, {STABLE: ["pod-0"]})):
        res = scoped.build_all(scoped_state(plans, loaded), r.ListenerConfig(rest_port=1, grpc_port=2))
        assert {f"traffic/{n}" for n in plans} <= set(res.by_type[r.ROUTE_TYPE])
        _validate(tmp_path, f"s{i}.json", _static_scoped_bootstrap(res))
