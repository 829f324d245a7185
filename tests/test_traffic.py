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
from meshserve_xds import resources as r

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
    routes = _unpack(_entry(r.build_rest_routes(state({"m": plan})), "/v2/models/m/"))
    assert len(routes) == 1
    wc = routes[0].route.weighted_clusters.clusters
    got = {(c.name, c.request_headers_to_add[0].header.value): c.weight.value for c in wc}
    # 90% over two pods, 10% on one: integer weights keep the exact ratio.
    assert got == {("pod_pod-0_rest", STABLE): 45000, ("pod_pod-1_rest", STABLE): 45000, ("pod_pod-0_rest", CANARY): 10000}
    assert not routes[0].route.prefix_rewrite  # the path cannot be rewritten per cluster; mm-model-id picks the model


def test_header_branch_then_default_in_order() -> None:
    routes = _unpack(_entry(r.build_rest_routes(state({"m": full_plan()})), "/v2/models/m/"))
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
    routes = _unpack(_entry(r.build_rest_routes(state({"m": plan}, loaded={STABLE: ["pod-0"]})), "/v2/models/m/"))
    got = {c.name: c.request_headers_to_add[0].header.value for c in routes[0].route.weighted_clusters.clusters}
    assert got == {"pod_pod-0_rest": STABLE, r.ACTIVATOR_REST: CANARY}


def test_grpc_alias_entry_follows_the_plan() -> None:
    cfg = r.build_grpc_routes(state({"m": full_plan()}))
    by_alias = cfg.virtual_hosts[0].matcher.on_no_match.matcher.matcher_tree.exact_match_map.map
    routes = _unpack(by_alias["m"])
    assert routes[1].route.weighted_clusters.clusters[0].name.endswith("_grpc")


def test_no_plans_means_unchanged_routes() -> None:
    s = state({})
    assert r.build_rest_routes(s) == r.build_rest_routes(state({}))
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
        f.write_text(json.dumps(_static_bootstrap(r.build_all(state(plans, loaded), r.ListenerConfig(rest_port=1, grpc_port=2)))))
        envoy = Path(sys.executable).with_name("envoy")
        out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stderr[-2000:]
