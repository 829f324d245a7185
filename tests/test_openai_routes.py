"""Kind: unit (pure). The gateway's config for OpenAI-style requests (issue 17, item 4): the body's
`model` is read on /v1/ paths only, a loaded model's RouteConfiguration routes /v1/ to its pods,
and Envoy's own /v1 replies are in OpenAI's error shape. Envoy itself runs them in
e2e/test_openai.py."""

from __future__ import annotations

from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from meshserve_xds import clusters, listeners, lua, scoped_routes
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
