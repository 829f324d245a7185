"""The matcher layout (MESHSERVE_XDS_LAYOUT=matcher; docs/design/routing.md): one
RouteConfiguration per listener, found through a `VirtualHost.matcher` tree. Pure.

- REST: an exact map on `:path` for `/v2/models/<name>` and a prefix map for
  `/v2/models/<name>/`, for every name of every *loaded* model; anything else falls through to
  the activator, which loads on demand, so 100,000 registered models cost nothing until used.
  `/v1/` (OpenAI) is one more prefix entry: a map on `x-ms-model` (the body's `model`, set by
  the listener's filters) with an entry per name of every loaded model.
- gRPC: an exact map on `mm-model-id`, then one on `mm-vmodel-id`, then the activator.
- Names with a traffic plan take their entries from traffic.py.

The same routes without our listeners serve an Istio gateway (ISTIO_GROUP), whose listener
comes from istiod: `MatcherLayout(None, ISTIO_GROUP, share=...)`.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshserve_xds import traffic
from meshserve_xds.clusters import build_clusters, copies_cluster
from meshserve_xds.listeners import build_listener
from meshserve_xds.resources import (
    ACTIVATOR_GRPC, ACTIVATOR_REST, CLUSTER_TYPE, ENDPOINT_TYPE, GRPC, KEY_HEADER, LISTENER_TYPE, MODEL_ID_HEADER, MODELS_PREFIX, REST,
    ROUTE_TIMEOUT_S, ROUTE_TYPE, VMODEL_ID_HEADER, ListenerConfig, Patch, Resources, RoutingState, names_for,
)
from meshserve_xds.openai import OPENAI_PREFIX
from meshserve_xds.routes import activator_action, header_tree, on_match_route, on_match_routes, route_action, set_model_header, transformer_action


def build_rest_routes(state: RoutingState) -> route_pb2.RouteConfiguration:
    exact: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    prefix: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    openai_: dict[str, matcher_pb2.Matcher.OnMatch] = {}  # by the body's `model` (x-ms-model)
    for model, names in names_for(state).items():
        clusters = [copies_cluster(state.loaded[model], "rest")]
        headers = set_model_header(model)
        v1 = on_match_route(rc.Route(stat_prefix=model, match=rc.RouteMatch(prefix="/"), route=route_action(clusters, ROUTE_TIMEOUT_S),
                                     request_headers_to_add=headers))
        for name in names:
            openai_[name] = v1
            base = MODELS_PREFIX + name
            exact[base] = on_match_route(
                rc.Route(
                    # Per-model request stats come from Envoy itself (no Python on the data path);
                    # they exist only for loaded models, which bounds their cardinality.
                    stat_prefix=model,
                    match=rc.RouteMatch(path=base),
                    route=_with_rewrite(route_action(clusters, ROUTE_TIMEOUT_S), MODELS_PREFIX + model),
                    request_headers_to_add=headers,
                )
            )
            prefix[base + "/"] = on_match_route(
                rc.Route(
                    stat_prefix=model,
                    match=rc.RouteMatch(prefix=base + "/"),
                    route=_with_rewrite(route_action(clusters, ROUTE_TIMEOUT_S), MODELS_PREFIX + model + "/"),
                    request_headers_to_add=headers,
                )
            )
    if state.traffic:
        traffic.add_rest_routes(state, exact, prefix)
        for name, plan in state.traffic.items():  # the same split for /v1/, the path as it came
            openai_[name] = on_match_routes(traffic.plan_routes(state, plan, "rest", lambda: rc.RouteMatch(prefix="/"), None))
    for name in state.transformers:
        base = MODELS_PREFIX + name
        exact[base] = on_match_route(rc.Route(stat_prefix=name, match=rc.RouteMatch(path=base), route=transformer_action(state, name)))
        prefix[base + "/"] = on_match_route(rc.Route(stat_prefix=name, match=rc.RouteMatch(prefix=base + "/"), route=transformer_action(state, name)))
    fallback = on_match_route(
        rc.Route(match=rc.RouteMatch(prefix="/"), route=activator_action(state, ACTIVATOR_REST))
    )
    # /v1/ (OpenAI): the body's `model`, which the listener's filters put in x-ms-model, looked
    # up like a name; a cold or unknown one, or none (GET /v1/models), goes to the activator.
    if openai_:
        prefix[OPENAI_PREFIX] = matcher_pb2.Matcher.OnMatch(matcher=header_tree(KEY_HEADER, "exact_match_map", openai_, fallback))
    matcher = header_tree(":path", "exact_match_map", exact, matcher_pb2.Matcher.OnMatch(matcher=header_tree(":path", "prefix_match_map", prefix, fallback)))
    vh = rc.VirtualHost(name="models", domains=["*"], matcher=matcher)
    return route_pb2.RouteConfiguration(name=REST, virtual_hosts=[vh])


def _with_rewrite(action: rc.RouteAction, rewrite: str) -> rc.RouteAction:
    action.prefix_rewrite = rewrite
    return action


def build_grpc_routes(state: RoutingState) -> route_pb2.RouteConfiguration:
    by_id: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    by_alias: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    for model, names in names_for(state).items():
        clusters = [copies_cluster(state.loaded[model], "grpc")]
        route = rc.Route(
            stat_prefix=model, match=rc.RouteMatch(prefix="/"), route=route_action(clusters, ROUTE_TIMEOUT_S), request_headers_to_add=set_model_header(model)
        )
        by_id[model] = on_match_route(route)
        for name in names:
            by_alias[name] = on_match_route(route)
    if state.traffic:
        traffic.add_grpc_routes(state, by_alias)
    fallback = on_match_route(
        rc.Route(match=rc.RouteMatch(prefix="/"), route=activator_action(state, ACTIVATOR_GRPC))
    )
    matcher = header_tree(
        MODEL_ID_HEADER,
        "exact_match_map",
        by_id,
        matcher_pb2.Matcher.OnMatch(matcher=header_tree(VMODEL_ID_HEADER, "exact_match_map", by_alias, fallback)),
    )
    vh = rc.VirtualHost(name="models", domains=["*"], matcher=matcher)
    return route_pb2.RouteConfiguration(name=GRPC, virtual_hosts=[vh])


def build_all(state: RoutingState, listeners: ListenerConfig | None) -> Resources:
    """Every resource for one gateway group. `listeners=None` is Istio/ASM mode: the
    listener comes from elsewhere and only routes, clusters and endpoints are served."""
    clusters, endpoints = build_clusters(state)
    res = Resources()
    res.by_type[CLUSTER_TYPE] = clusters
    res.by_type[ENDPOINT_TYPE] = endpoints
    res.by_type[ROUTE_TYPE] = {REST: build_rest_routes(state), GRPC: build_grpc_routes(state)}
    res.by_type[LISTENER_TYPE] = (
        {
            REST: build_listener(REST, listeners.host, listeners.rest_port, False),
            GRPC: build_listener(GRPC, listeners.host, listeners.grpc_port, True),
        }
        if listeners
        else {}
    )
    return res


class MatcherLayout:
    """Builds whole on every change: the route tables are one resource per listener, so there
    is nothing smaller to patch. The cache sends only the types whose bytes moved.

    `share`: another MatcherLayout built from the same state just before (the gateway's, when
    this one serves Istio): its clusters and routes are taken as they are, so they are built,
    and serialized by the cache, once for both groups."""

    def __init__(self, listeners: ListenerConfig | None, group: str, share: "MatcherLayout | None" = None):
        self.listeners, self.group, self.share = listeners, group, share
        self.last: tuple[RoutingState, Resources] | None = None
        self.keep_last = False  # only while another layout shares this one's builds
        if share is not None:
            share.keep_last = True

    def build_full(self, state: RoutingState) -> Resources:
        shared = self.share.last if self.share is not None else None
        if shared is not None and shared[0] is state and self.listeners is None:
            res = Resources(by_type={**shared[1].by_type, LISTENER_TYPE: {}})
        else:
            res = build_all(state, self.listeners)
        if self.keep_last:
            self.last = (state, res)
        return res

    def apply_change(self, state: RoutingState) -> Resources | Patch:
        return self.build_full(state)

    def apply_partial(self, part: RoutingState, models: set[str], names: set[str]) -> Patch | None:
        return None
