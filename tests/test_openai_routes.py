"""Kind: unit (pure). The gateway's config for OpenAI-style requests (issue 17, item 4): the body's
`model` is read on /v1/ paths only, a loaded model's RouteConfiguration routes /v1/ to its pods,
and Envoy's own /v1 replies are in OpenAI's error shape; in the matcher layout too, and a name
with a traffic plan splits /v1 like v2. Envoy itself runs them in e2e/test_openai.py and
e2e/test_openai_generate.py."""

from __future__ import annotations

from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.config.route.v3 import route_components_pb2 as rc_pb
from envoy.type.matcher.v3 import http_inputs_pb2
from meshserve_xds import clusters, listeners, lua, matcher, scoped_routes
from meshserve_xds import resources as r
from meshserve_xds import scoped


def _manager(http2: bool) -> hcm.HttpConnectionManager:
    lst = listeners.build_scoped_listener(r.GRPC if http2 else r.REST, "127.0.0.1", 1, http2)
    m = hcm.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(m)
    return m


def test_rest_listener_reads_the_model_from_v1_bodies_only() -> None:
    m = _manager(False)
    assert [f.name for f in m.http_filters] == ["meshserve.openai_model", "envoy.filters.http.lua", "envoy.filters.http.on_demand", "envoy.filters.http.router"]
    wrapped = extension_matcher_pb2.ExtensionWithMatcher()
    m.http_filters[0].typed_config.Unpack(wrapped)
    pred = wrapped.xds_matcher.matcher_list.matchers[0].predicate
    assert pred.not_matcher.single_predicate.value_match.prefix == "/v1/"  # skipped unless /v1/
    cfg = j2m.JsonToMetadata()
    wrapped.extension_config.typed_config.Unpack(cfg)
    assert cfg.request_rules.rules[0].selectors[0].key == "model"
    assert "dynamicMetadata():get(\"envoy.filters.http.json_to_metadata\")" in lua.SCOPE_KEY_LUA
    # gRPC never buffers a body for it.
    assert "meshserve.openai_model" not in [f.name for f in _manager(True).http_filters]


def test_v1_local_replies_are_openai_errors_first() -> None:
    mappers = _manager(False).local_reply_config.mappers
    first = mappers[0]
    err = first.body_format_override.json_format["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "invalid_request_error"
    assert first.filter.and_filter.filters[0].header_filter.header.string_match.prefix == "/v1/"
    assert "message" in mappers[1].body_format_override.json_format["error"]


def test_loaded_model_routes_v1_to_its_pods() -> None:
    state = r.RoutingState(pods={"p0": r.Endpoint("127.0.0.1", 1, 2)}, loaded={"m__isvc-1": ["p0"]}, aliases={"m": "m__isvc-1"},
                           activator=r.Endpoint("127.0.0.1", 3, 4))
    rc = scoped_routes.model_routes(state, "m__isvc-1")
    grpc, rest = rc.virtual_hosts[0].routes  # no extra route per model: REST takes /v1/ too
    assert rest.match.prefix == "/" and rest.route.cluster == clusters.pod_cluster("p0", "rest")
    # The rewrite touches only a v2 path's name segment; a /v1/ path goes as it came.
    assert rest.route.regex_rewrite.pattern.regex == "^/v2/models/[^/?]+" and not rest.route.prefix_rewrite
    assert rc.virtual_hosts[0].request_headers_to_add[0].header.value == "m__isvc-1"


# -- The matcher layout (MESHSERVE_XDS_LAYOUT=matcher): /v1/ by the body's model, no activator hop --

def _matcher_manager() -> hcm.HttpConnectionManager:
    lst = listeners.build_listener(r.REST, "127.0.0.1", 1, False)
    m = hcm.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(m)
    return m


def _v1_map(rc) -> dict:  # type: ignore[no-untyped-def]
    """The matcher layout's /v1/ entry: header name and its exact map."""
    prefix_tree = rc.virtual_hosts[0].matcher.on_no_match.matcher.matcher_tree
    v1 = prefix_tree.prefix_match_map.map["/v1/"].matcher
    return {"fallback": v1.on_no_match, "entries": dict(v1.matcher_tree.exact_match_map.map), "input": v1.matcher_tree.input}


def _route(on_match) -> rc_pb.Route:  # type: ignore[no-untyped-def]
    route = rc_pb.Route()
    on_match.action.typed_config.Unpack(route)
    return route


def test_matcher_listener_keys_v1_on_the_body_model_only_on_v1() -> None:
    m = _matcher_manager()
    assert [f.name for f in m.http_filters] == ["meshserve.openai_model", "meshserve.openai_key", "envoy.filters.http.router"]
    for f in m.http_filters[:2]:  # both skipped on anything but /v1/: v2 bodies are never buffered
        wrapped = extension_matcher_pb2.ExtensionWithMatcher()
        f.typed_config.Unpack(wrapped)
        assert wrapped.xds_matcher.matcher_list.matchers[0].predicate.not_matcher.single_predicate.value_match.prefix == "/v1/"
    assert 'hs:remove("x-ms-model")' in lua.OPENAI_KEY_LUA  # a client's own header never routes
    assert m.local_reply_config.mappers[0].body_format_override.json_format["error"]["code"] == "model_not_found"
    grpc = hcm.HttpConnectionManager()
    listeners.build_listener(r.GRPC, "127.0.0.1", 2, True).filter_chains[0].filters[0].typed_config.Unpack(grpc)
    assert "meshserve.openai_model" not in [f.name for f in grpc.http_filters]


def test_matcher_routes_v1_by_name_to_the_pods() -> None:
    state = r.RoutingState(pods={"p0": r.Endpoint("127.0.0.1", 1, 2)}, loaded={"m__isvc-1": ["p0"]}, aliases={"m": "m__isvc-1"},
                           activator=r.Endpoint("127.0.0.1", 3, 4))
    v1 = _v1_map(matcher.build_rest_routes(state))
    header = http_inputs_pb2.HttpRequestHeaderMatchInput()
    v1["input"].typed_config.Unpack(header)
    assert header.header_name == r.KEY_HEADER and set(v1["entries"]) == {"m", "m__isvc-1"}
    route = _route(v1["entries"]["m"])
    assert route.route.cluster == clusters.pod_cluster("p0", "rest") and not route.route.prefix_rewrite  # the path as it came
    assert route.request_headers_to_add[0].header.value == "m__isvc-1"
    assert _route(v1["fallback"]).route.cluster == r.ACTIVATOR_REST  # cold, unknown, or GET /v1/models


def test_v1_follows_a_traffic_split_in_both_layouts() -> None:
    from meshserve.rules.plan import Branch, Plan

    state = r.RoutingState(pods={"p0": r.Endpoint("127.0.0.1", 1, 2)}, loaded={"m__isvc-1": ["p0"], "n__isvc-2": ["p0"]},
                           aliases={"m": "m__isvc-1", "n": "n__isvc-2"}, activator=r.Endpoint("127.0.0.1", 3, 4),
                           traffic={"m": Plan(name="m", branches=[Branch((("m__isvc-1", 70), ("n__isvc-2", 30)))])})
    split = _route(_v1_map(matcher.build_rest_routes(state))["entries"]["m"])
    got = {c.request_headers_to_add[0].header.value: c.weight.value for c in split.route.weighted_clusters.clusters}
    assert got == {"m__isvc-1": 70000, "n__isvc-2": 30000}
    routes = scoped_routes.traffic_routes(state, "m", state.traffic["m"]).virtual_hosts[0].routes
    (v1,) = [x for x in routes if x.match.prefix == "/v1/"]
    assert {c.request_headers_to_add[0].header.value for c in v1.route.weighted_clusters.clusters} == {"m__isvc-1", "n__isvc-2"}
    assert routes[-1].route.cluster == r.ACTIVATOR_REST and routes[-1].match.prefix == "/"  # after the /v1/ branch
