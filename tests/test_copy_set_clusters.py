"""A model with several copies routes to one cluster holding all its pods, so Envoy's retry of a
refused or reset request goes to another copy (issue 9, fault case 3).

Kind: unit (pure) plus one check by the real Envoy binary (`--mode validate`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from envoy.config.route.v3 import route_components_pb2 as rc
from meshserve_xds import matcher, scoped_routes
from meshserve_xds.clusters import build_clusters
from meshserve_xds import resources as r
from meshserve_xds import scoped
from tests.test_resources import _static_bootstrap

ACT = r.Endpoint("127.0.0.1", 1, 2)
PODS = {f"pod-{i}": r.Endpoint("127.0.0.1", 3000 + 10 * i, 3001 + 10 * i) for i in range(3)}


def state(loaded: dict[str, list[str]]) -> r.RoutingState:
    return r.RoutingState(pods=dict(PODS), loaded=loaded, aliases={m.split("__")[0]: m for m in loaded}, activator=ACT)


def _route(cfg: object, key: str) -> rc.Route:
    route = rc.Route()
    exact = cfg.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map  # type: ignore[attr-defined]
    exact[key].action.typed_config.Unpack(route)
    return route


def test_two_copies_route_to_one_cluster_with_both_pods() -> None:
    s = state({"a__isvc-0000000001": ["pod-2", "pod-0"], "b__isvc-0000000002": ["pod-1"]})
    res = matcher.build_all(s, r.ListenerConfig())
    a = _route(res.by_type[r.ROUTE_TYPE][r.REST], "/v2/models/a")
    assert a.route.cluster == "pods_pod-0+pod-2_rest" and not a.route.HasField("weighted_clusters")
    assert _route(res.by_type[r.ROUTE_TYPE][r.REST], "/v2/models/b").route.cluster == "pod_pod-1_rest"
    grpc = _route(res.by_type[r.ROUTE_TYPE][r.GRPC], "a__isvc-0000000001")
    assert grpc.route.cluster == "pods_pod-0+pod-2_grpc"
    eps = res.by_type[r.ENDPOINT_TYPE]["pods_pod-0+pod-2_rest"].endpoints[0].lb_endpoints
    assert [e.endpoint.address.socket_address.port_value for e in eps] == [3000, 3020]
    eps = res.by_type[r.ENDPOINT_TYPE]["pods_pod-0+pod-2_grpc"].endpoints[0].lb_endpoints
    assert [e.endpoint.address.socket_address.port_value for e in eps] == [3001, 3021]
    assert res.by_type[r.CLUSTER_TYPE]["pods_pod-0+pod-2_grpc"].typed_extension_protocol_options  # HTTP/2, as the pods' own


def test_retries_go_to_a_host_not_tried_yet() -> None:
    s = state({"a__isvc-0000000001": ["pod-0", "pod-1"]})
    policy = _route(matcher.build_rest_routes(s), "/v2/models/a").route.retry_policy
    assert policy.retry_on == "connect-failure,refused-stream,reset" and policy.num_retries.value == 2
    assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert policy.host_selection_retry_max_attempts >= 2


def test_copy_sets_are_shared_and_follow_the_placements() -> None:
    s = state({f"m{i}__isvc-00000000{i:02d}": ["pod-0", "pod-1"] for i in range(50)} | {"x__isvc-0000000099": ["pod-1", "pod-2"]})
    clusters = matcher.build_all(s, r.ListenerConfig()).by_type[r.CLUSTER_TYPE]
    # 2 activator + 2 per pod + 2 per copy set in use
    assert len(clusters) == 2 + 2 * 3 + 2 * 2
    # A copy on a pod that is gone (not in pods) names no cluster of a set.
    s = state({"a__isvc-0000000001": ["pod-0"]})
    assert set(matcher.build_all(s, r.ListenerConfig()).by_type[r.CLUSTER_TYPE]) == set(build_clusters(s, copy_sets=False)[0])


def test_scoped_layout_routes_copies_to_their_set() -> None:
    s = state({"a__isvc-0000000001": ["pod-0", "pod-1"]})
    res = scoped.build_all(s, r.ListenerConfig())
    assert {"pods_pod-0+pod-1_rest", "pods_pod-0+pod-1_grpc"} <= set(res.by_type[r.CLUSTER_TYPE])
    routes = res.by_type[r.ROUTE_TYPE][scoped_routes.model_rc_name("a__isvc-0000000001")].virtual_hosts[0].routes
    assert [rt.route.cluster for rt in routes[:2]] == ["pods_pod-0+pod-1_grpc", "pods_pod-0+pod-1_rest"]


def test_scoped_partial_patches_add_and_drop_a_set_with_its_first_and_last_model() -> None:
    """What the live publisher does per placement change: a set's clusters come with the first
    model routed to it and go with the last, in the same patch as the routes."""
    m1, m2 = "a__isvc-0000000001", "b__isvc-0000000002"
    idx = scoped.index(state({m1: ["pod-0"], m2: ["pod-0"]}))

    def change(loaded: dict[str, list[str]], models: set[str]) -> r.Patch:
        part = r.RoutingState(pods={p: PODS[p] for ps in loaded.values() for p in ps}, loaded=loaded, aliases={}, activator=ACT,
                              registered=set(models))
        return scoped.diff_partial(idx, part, models, set(models))

    p = change({m1: ["pod-0", "pod-1"]}, {m1})
    assert set(p.upserts[r.CLUSTER_TYPE]) == set(p.upserts[r.ENDPOINT_TYPE]) == {"pods_pod-0+pod-1_rest", "pods_pod-0+pod-1_grpc"}
    p = change({m2: ["pod-0", "pod-1"]}, {m2})
    assert not p.upserts[r.CLUSTER_TYPE], "the set exists already"
    p = change({m1: ["pod-1"]}, {m1})
    assert not p.removes[r.CLUSTER_TYPE], "m2 still routes to the set"
    p = change({m2: ["pod-1"]}, {m2})
    assert set(p.removes[r.CLUSTER_TYPE]) == {"pods_pod-0+pod-1_rest", "pods_pod-0+pod-1_grpc"}
    assert idx.sets == {}
    # The index the patches kept equals a fresh one.
    fresh = scoped.index(state({m1: ["pod-1"], m2: ["pod-1"]}))
    assert idx.models == fresh.models and idx.sets == fresh.sets


def test_real_envoy_accepts_copy_set_clusters_and_the_retry_policy(tmp_path: Path) -> None:
    s = state({"a__isvc-0000000001": ["pod-0", "pod-1"], "b__isvc-0000000002": ["pod-2"]})
    f = tmp_path / "b.json"
    f.write_text(json.dumps(_static_bootstrap(matcher.build_all(s, r.ListenerConfig(rest_port=1, grpc_port=2)))))
    envoy = Path(sys.executable).with_name("envoy")
    out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stderr[-2000:]
