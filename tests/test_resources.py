"""Kind: unit (pure) plus one check by the real Envoy binary (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from meshserve_xds import listeners, matcher
from meshserve_xds import resources as r

ACT = r.Endpoint("127.0.0.1", 1, 2)


def state(n_models: int = 1, pods: int = 2) -> r.RoutingState:
    pod_eps = {f"pod-{i}": r.Endpoint("127.0.0.1", 3000 + 10 * i, 3001 + 10 * i) for i in range(pods)}
    loaded = {f"m{i}__isvc-0000000000": [f"pod-{i % pods}"] for i in range(n_models)}
    aliases = {f"m{i}": f"m{i}__isvc-0000000000" for i in range(n_models)}
    return r.RoutingState(pods=pod_eps, loaded=loaded, aliases=aliases, activator=ACT)


def test_clusters_follow_pods_not_models() -> None:
    res = matcher.build_all(state(n_models=500), r.ListenerConfig())
    assert len(res.by_type[r.CLUSTER_TYPE]) == 2 + 2 * 2


def test_istio_mode_serves_no_listeners() -> None:
    res = matcher.build_all(state(), None)
    assert res.by_type[r.LISTENER_TYPE] == {}
    assert set(res.by_type[r.ROUTE_TYPE]) == {r.REST, r.GRPC}


def test_rest_routes_rewrite_alias_to_concrete_model() -> None:
    rc = matcher.build_rest_routes(state())
    tree = rc.virtual_hosts[0].matcher
    exact = tree.matcher_tree.exact_match_map.map
    assert set(exact) == {"/v2/models/m0", "/v2/models/m0__isvc-0000000000"}
    from envoy.config.route.v3 import route_components_pb2

    route = route_components_pb2.Route()
    exact["/v2/models/m0"].action.typed_config.Unpack(route)
    assert route.route.prefix_rewrite == "/v2/models/m0__isvc-0000000000"
    assert route.route.cluster == "pod_pod-0_rest"


def test_empty_mesh_routes_everything_to_the_activator() -> None:
    """No model loaded: every path, /v1 included (its own route, for its stream timeouts),
    goes to the activator, which loads on first use."""
    from envoy.config.route.v3 import route_components_pb2

    m = matcher.build_rest_routes(state(n_models=0)).virtual_hosts[0].matcher
    actions = [m.on_no_match.action, *(v.action for v in m.matcher_tree.prefix_match_map.map.values()),
               *(v.action for v in m.matcher_tree.exact_match_map.map.values())]
    clusters = set()
    for a in actions:
        route = route_components_pb2.Route()
        a.typed_config.Unpack(route)
        clusters.add(route.route.cluster)
    assert clusters == {"meshserve_activator_rest"}


def test_server_reflection_goes_to_the_activator_in_either_layout() -> None:
    """grpcurl without -proto asks /grpc.reflection.* first, with its -H model headers on it: the
    activator answers it (e2e/test_grpc_reflection.py runs it through Envoy)."""
    from meshserve_xds import lua, scoped_routes

    act = {x.match.prefix: x.route.cluster for x in scoped_routes.activator_routes(state()).virtual_hosts[0].routes}
    assert act[r.REFLECTION_PREFIX] == r.ACTIVATOR_GRPC
    # The scope key ignores the headers on it; the matcher layout drops them, so its fallback takes it.
    assert f'hs:add("{r.KEY_HEADER}", "{r.NO_MODEL}")' in lua.SCOPE_KEY_LUA.split("REFLECTION then", 1)[1].split("end", 1)[0]
    assert f'hs:remove("{r.VMODEL_ID_HEADER}")' in lua.MODEL_HEADER_LUA.split("REFLECTION then", 1)[1].split("end", 1)[0]


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


def test_real_envoy_accepts_the_resources(tmp_path: Path) -> None:
    for n in (0, 3):
        f = tmp_path / f"b{n}.json"
        f.write_text(json.dumps(_static_bootstrap(matcher.build_all(state(n_models=n), r.ListenerConfig(rest_port=1, grpc_port=2)))))
        envoy = Path(sys.executable).with_name("envoy")
        out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(f)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stderr[-2000:]


def test_scoped_listeners_key_then_wait_for_new_route_configs_then_route() -> None:
    """The scoped layout's listeners: the Lua filter sets the scope key, the on_demand filter holds
    a request whose scope names a RouteConfiguration not received yet (a model that just
    loaded), then the router. On REST the OpenAI body reader comes first (tests/test_openai_routes.py),
    on gRPC the field extraction that reads a stream's first request (grpc_fields.py)."""
    from meshserve_xds import scoped

    res = scoped.build_all(state(), r.ListenerConfig())
    for name, lst in res.by_type[r.LISTENER_TYPE].items():
        m = hcm.HttpConnectionManager()
        lst.filter_chains[0].filters[0].typed_config.Unpack(m)
        first = ["meshserve.openai_model"] if name == r.REST else ["envoy.filters.http.grpc_field_extraction"]
        assert [f.name for f in m.http_filters] == first + ["envoy.filters.http.lua", "envoy.filters.http.on_demand", "envoy.filters.http.router"]
        assert m.scoped_routes.scoped_rds.HasField("scoped_rds_config_source") and not m.HasField("rds")


def test_listeners_hold_one_request_limit_and_serve_http_1_0() -> None:
    """Kind: unit (pure). Issue 18 §3: the gRPC listener's stream window fits a MAX_REQUEST_BYTES
    message (the Lua filter buffers it when there is no routing header; Envoy's 16 MiB default
    refused bigger) and its 413 is RESOURCE_EXHAUSTED; the REST listener accepts HTTP/1.0."""
    from meshserve.settings import MAX_REQUEST_BYTES
    from meshserve_xds import scoped

    for build in (listeners.build_listener, listeners.build_scoped_listener):
        managers = {}
        for http2_only in (True, False):
            m = hcm.HttpConnectionManager()
            build("l", "127.0.0.1", 1, http2_only).filter_chains[0].filters[0].typed_config.Unpack(m)
            managers[http2_only] = m
        grpc_m, rest_m = managers[True], managers[False]
        assert grpc_m.http2_protocol_options.initial_stream_window_size.value == MAX_REQUEST_BYTES + 5
        mapper = grpc_m.local_reply_config.mappers[0]
        assert mapper.filter.status_code_filter.comparison.value.default_value == 413
        assert [(h.header.key, h.header.value) for h in mapper.headers_to_add] == [("grpc-status", "8")]
        assert rest_m.http_protocol_options.accept_http_10
