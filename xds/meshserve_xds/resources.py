"""Envoy resources from routing state. Pure: plain data in, protobuf messages out.

Layout (docs/design/routing.md):
- Listeners `meshserve_rest` (8008) and `meshserve_grpc` (8033), each an HTTP connection
  manager taking its RouteConfiguration of the same name over ADS.
- Clusters: one per runtime pod and protocol (`pod_<id>_rest`, `pod_<id>_grpc`), plus the
  activator's two. Their endpoints come by EDS. The cluster count follows pods, not models,
  which keeps Envoy far from the per-cluster overheads that hurt at ~16,000 clusters.
  A model with several copies routes to one cluster per distinct set of pods holding it
  (`pods_<a>+<b>_rest`), whose endpoints are those pods: Envoy retries only within the
  cluster a route picked, so this is what lets a retry reach another copy when a pod dies.
  Those add one cluster per copy set in use (sets are shared by models), not per model.
- Routes: only *loaded* models get a route, found through a `VirtualHost.matcher` tree
  (a hash/trie lookup, not a linear scan). Everything else falls through to the activator,
  which loads on demand, so 100,000 registered models cost nothing until used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, duration_pb2, wrappers_pb2, struct_pb2

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from envoy.type.matcher.v3 import http_inputs_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_xds.grpc_model_header import lua_filter

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SCOPED_ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
VHOST_TYPE = "type.googleapis.com/envoy.config.route.v3.VirtualHost"
# The order a push goes out in: clusters warm before endpoints, listeners before routes
# (scopes before the route configurations they name, those before on-demand virtual hosts).
PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SCOPED_ROUTE_TYPE, ROUTE_TYPE, VHOST_TYPE)

REST = "meshserve_rest"
GRPC = "meshserve_grpc"
ACTIVATOR_REST = "meshserve_activator_rest"
ACTIVATOR_GRPC = "meshserve_activator_grpc"
MODEL_ID_HEADER = "mm-model-id"
VMODEL_ID_HEADER = "mm-vmodel-id"
MODELS_PREFIX = "/v2/models/"


@dataclass(frozen=True)
class Endpoint:
    host: str
    rest_port: int
    grpc_port: int


@dataclass(frozen=True)
class Transformer:
    """A KServe transformer process in front of a predictor (meshserve/transformer.py): its
    name's REST requests go to `endpoint`, named `predictor` there (the name it serves)."""

    endpoint: Endpoint
    predictor: str


@dataclass
class RoutingState:
    """What the gateway needs to know, and nothing more."""

    pods: dict[str, Endpoint]
    # concrete model id -> pods holding a loaded copy
    loaded: dict[str, list[str]]
    # alias -> concrete model id
    aliases: dict[str, str]
    activator: Endpoint
    cold_timeout_s: float = 65.0
    # name -> traffic plan (meshserve/rules/plan.py Plan) for names governed by traffic rules or
    # an InferenceService canary; rendered by traffic.py over the plain alias routes.
    traffic: dict[str, Any] = field(default_factory=dict)
    # every registered concrete id, loaded or not (the scoped layout gives each a scope)
    registered: set[str] = field(default_factory=set)
    # per-model route stats (Envoy `vhost.model.route.<id>.*`) in the scoped layout: off by
    # default, they cost ~4.5 KiB of gateway memory per loaded model (Settings.xds_route_stats)
    route_stats: bool = False
    # InferenceService name -> its transformer; that name routes to the transformer, ahead of
    # any model or plan of the same name
    transformers: dict[str, Transformer] = field(default_factory=dict)


@dataclass
class ListenerConfig:
    host: str = "127.0.0.1"
    rest_port: int = 8008
    grpc_port: int = 8033


@dataclass
class Resources:
    """type_url -> name -> message."""

    by_type: dict[str, dict[str, object]] = field(default_factory=dict)


def pod_cluster(pod: str, proto: str) -> str:
    return f"pod_{pod}_{proto}"


def transformer_cluster(name: str) -> str:
    return f"transformer_{name}_rest"


def transformer_action(state: "RoutingState", name: str) -> rc.RouteAction:
    """To the transformer, with the name segment of the path rewritten to the name it serves.
    Its timeout covers the predictor's cold start, which happens behind it."""
    from envoy.type.matcher.v3 import regex_pb2

    t = state.transformers[name]
    action = rc.RouteAction(cluster=transformer_cluster(name), timeout=duration_pb2.Duration(seconds=int(max(120, state.cold_timeout_s + 30))))
    action.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=r"^/v2/models/[^/?]+"), substitution=MODELS_PREFIX + t.predictor))
    return action


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)


def _any(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def _http2_options() -> dict[str, any_pb2.Any]:
    opts = hpo.HttpProtocolOptions(
        explicit_http_config=hpo.HttpProtocolOptions.ExplicitHttpConfig(http2_protocol_options=protocol_pb2.Http2ProtocolOptions())
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(opts)}


def build_cluster(name: str, http2: bool) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(nanos=250_000_000),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if http2:
        for k, v in _http2_options().items():
            c.typed_extension_protocol_options[k].CopyFrom(v)
    return c


def build_load_assignment(name: str, host: str, port: int, *more: tuple[str, int]) -> endpoint_pb2.ClusterLoadAssignment:
    eps = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=h, port_value=p))
            )
        )
        for h, p in ((host, port), *more)
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)]
    )


def build_copy_set_cluster(name: str, http2: bool) -> cluster_pb2.Cluster:
    """A copy set's cluster. A host that refuses a connection or resets is ejected at once (for
    a few seconds, at most half the hosts), so while placement notices a dead pod (two missed
    heartbeats) requests stop trying it and none is left waiting on a retry when the routes
    move and this cluster goes. Answers the runtime sends itself (5xx included) eject nothing."""
    c = build_cluster(name, http2)
    u32 = wrappers_pb2.UInt32Value
    c.outlier_detection.CopyFrom(outlier_detection_pb2.OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=u32(value=1),
        enforcing_consecutive_local_origin_failure=u32(value=100),
        enforcing_local_origin_success_rate=u32(value=0),
        enforcing_consecutive_5xx=u32(value=0),
        enforcing_consecutive_gateway_failure=u32(value=0),
        enforcing_success_rate=u32(value=0),
        base_ejection_time=duration_pb2.Duration(seconds=5),
        max_ejection_percent=u32(value=50),
    ))
    return c


def copies_cluster(pods: list[str], proto: str) -> str:
    """The cluster a model's route names: its pod's own for one copy, else its copy set's."""
    pods = sorted(pods)
    return pod_cluster(pods[0], proto) if len(pods) == 1 else f"pods_{'+'.join(pods)}_{proto}"


def build_clusters(state: RoutingState, copy_sets: bool = True) -> tuple[dict[str, object], dict[str, object]]:
    """Pod and activator clusters; with `copy_sets`, also one per set of pods that holds a
    model with several copies (what the matcher layout's routes name)."""
    clusters: dict[str, object] = {}
    endpoints: dict[str, object] = {}
    targets = [(ACTIVATOR_REST, state.activator, False), (ACTIVATOR_GRPC, state.activator, True)]
    for pod, ep in state.pods.items():
        targets += [(pod_cluster(pod, "rest"), ep, False), (pod_cluster(pod, "grpc"), ep, True)]
    for name, t in state.transformers.items():
        targets.append((transformer_cluster(name), t.endpoint, False))
    for name, ep, http2 in targets:
        clusters[name] = build_cluster(name, http2)
        endpoints[name] = build_load_assignment(name, ep.host, ep.grpc_port if http2 else ep.rest_port)
    if copy_sets:
        for pods in sorted(copy_sets_of(state.loaded.values(), state.pods)):
            c, e = build_copy_set(pods, state.pods)
            clusters.update(c)
            endpoints.update(e)
    return clusters, endpoints


def copy_sets_of(placements: Any, pods: dict[str, Endpoint]) -> set[tuple[str, ...]]:
    """The distinct sets of two or more known pods that hold a model: one cluster pair each."""
    return {tuple(sorted(ps)) for ps in placements if len(ps) > 1 and all(p in pods for p in ps)}


def build_copy_set(pods: tuple[str, ...], endpoints: dict[str, Endpoint]) -> tuple[dict[str, object], dict[str, object]]:
    """A copy set's REST and gRPC clusters and their endpoints (the set's pods)."""
    clusters: dict[str, object] = {}
    assignments: dict[str, object] = {}
    for proto, http2 in (("rest", False), ("grpc", True)):
        name = copies_cluster(list(pods), proto)
        addrs = [(endpoints[p].host, endpoints[p].grpc_port if http2 else endpoints[p].rest_port) for p in pods]
        clusters[name] = build_copy_set_cluster(name, http2)
        assignments[name] = build_load_assignment(name, *addrs[0], *addrs[1:])
    return clusters, assignments


def _route_action(clusters: list[str], timeout_s: float) -> rc.RouteAction:
    action = rc.RouteAction(timeout=duration_pb2.Duration(seconds=int(timeout_s)))
    if len(clusters) == 1:
        action.cluster = clusters[0]
    else:
        action.weighted_clusters.CopyFrom(
            rc.WeightedCluster(clusters=[rc.WeightedCluster.ClusterWeight(name=c, weight=wrappers_pb2.UInt32Value(value=1)) for c in clusters])
        )
    # A pod that refuses or resets is retried. In a copy set's cluster the retry goes to a
    # host not tried yet (another copy), so a pod that just died costs no request.
    action.retry_policy.CopyFrom(
        rc.RetryPolicy(
            retry_on="connect-failure,refused-stream,reset",
            num_retries=wrappers_pb2.UInt32Value(value=2),
            retry_host_predicate=[rc.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()),
            )],
            host_selection_retry_max_attempts=5,
        )
    )
    return action


def _set_model_header(model_id: str) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=MODEL_ID_HEADER, value=model_id),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ]


def _on_match_route(route: rc.Route) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name="route", typed_config=_any(route)))


def _header_input(name: str) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(
        name="header", typed_config=_any(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=name))
    )


def _tree(header: str, kind: str, entries: dict[str, matcher_pb2.Matcher.OnMatch], on_no_match: matcher_pb2.Matcher.OnMatch) -> matcher_pb2.Matcher:
    """A map lookup on one header, falling through to `on_no_match`. Envoy requires a map to
    be non-empty, so an empty one collapses into its fallback."""
    if not entries:
        return on_no_match.matcher if on_no_match.HasField("matcher") else matcher_pb2.Matcher(on_no_match=on_no_match)
    tree = matcher_pb2.Matcher.MatcherTree(input=_header_input(header))
    target = getattr(tree, kind)
    for k, v in entries.items():
        target.map[k].CopyFrom(v)
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=on_no_match)


def _names_for(state: RoutingState) -> dict[str, list[str]]:
    """concrete id -> every name a client may use for it (itself and its aliases)."""
    names: dict[str, list[str]] = {m: [m] for m in state.loaded}
    for alias, model in state.aliases.items():
        if model in names:
            names[model].append(alias)
    return names


def build_rest_routes(state: RoutingState) -> route_pb2.RouteConfiguration:
    exact: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    prefix: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    for model, names in _names_for(state).items():
        clusters = [copies_cluster(state.loaded[model], "rest")]
        headers = _set_model_header(model)
        for name in names:
            base = MODELS_PREFIX + name
            exact[base] = _on_match_route(
                rc.Route(
                    # Per-model request stats come from Envoy itself (no Python on the data path);
                    # they exist only for loaded models, which bounds their cardinality.
                    stat_prefix=model,
                    match=rc.RouteMatch(path=base),
                    route=_with_rewrite(_route_action(clusters, 120), MODELS_PREFIX + model),
                    request_headers_to_add=headers,
                )
            )
            prefix[base + "/"] = _on_match_route(
                rc.Route(
                    stat_prefix=model,
                    match=rc.RouteMatch(prefix=base + "/"),
                    route=_with_rewrite(_route_action(clusters, 120), MODELS_PREFIX + model + "/"),
                    request_headers_to_add=headers,
                )
            )
    if state.traffic:
        from meshserve_xds.traffic import add_rest_routes  # lazy: traffic.py imports this module

        add_rest_routes(state, exact, prefix)
    for name in state.transformers:
        base = MODELS_PREFIX + name
        exact[base] = _on_match_route(rc.Route(stat_prefix=name, match=rc.RouteMatch(path=base), route=transformer_action(state, name)))
        prefix[base + "/"] = _on_match_route(rc.Route(stat_prefix=name, match=rc.RouteMatch(prefix=base + "/"), route=transformer_action(state, name)))
    fallback = _on_match_route(
        rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=ACTIVATOR_REST, timeout=duration_pb2.Duration(seconds=int(state.cold_timeout_s))))
    )
    matcher = _tree(":path", "exact_match_map", exact, matcher_pb2.Matcher.OnMatch(matcher=_tree(":path", "prefix_match_map", prefix, fallback)))
    vh = rc.VirtualHost(name="models", domains=["*"], matcher=matcher)
    return route_pb2.RouteConfiguration(name=REST, virtual_hosts=[vh])


def _with_rewrite(action: rc.RouteAction, rewrite: str) -> rc.RouteAction:
    action.prefix_rewrite = rewrite
    return action


def build_grpc_routes(state: RoutingState) -> route_pb2.RouteConfiguration:
    by_id: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    by_alias: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    for model, names in _names_for(state).items():
        clusters = [copies_cluster(state.loaded[model], "grpc")]
        route = rc.Route(
            stat_prefix=model, match=rc.RouteMatch(prefix="/"), route=_route_action(clusters, 120), request_headers_to_add=_set_model_header(model)
        )
        by_id[model] = _on_match_route(route)
        for name in names:
            by_alias[name] = _on_match_route(route)
    if state.traffic:
        from meshserve_xds.traffic import add_grpc_routes

        add_grpc_routes(state, by_alias)
    fallback = _on_match_route(
        rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=ACTIVATOR_GRPC, timeout=duration_pb2.Duration(seconds=int(state.cold_timeout_s))))
    )
    matcher = _tree(
        MODEL_ID_HEADER,
        "exact_match_map",
        by_id,
        matcher_pb2.Matcher.OnMatch(matcher=_tree(VMODEL_ID_HEADER, "exact_match_map", by_alias, fallback)),
    )
    vh = rc.VirtualHost(name="models", domains=["*"], matcher=matcher)
    return route_pb2.RouteConfiguration(name=GRPC, virtual_hosts=[vh])


def _json_errors() -> hcm.LocalReplyConfig:
    """Replies Envoy makes itself (no upstream, timeouts) come as KServe v2 error JSON."""
    body = struct_pb2.Struct()
    body.update({"error": "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)"})
    return hcm.LocalReplyConfig(
        body_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=body, content_type="application/json")
    )


# The gRPC frame prefix (compressed flag, length) before each message.
GRPC_FRAME_PREFIX = 5
GRPC_RESOURCE_EXHAUSTED = "8"


def _grpc_limits() -> tuple[protocol_pb2.Http2ProtocolOptions, hcm.ResponseMapper]:
    """One request size limit for gRPC whether or not the client sends a routing header.

    Without one, the Lua filter buffers the message to read the model name, and Envoy caps a
    buffered stream at its HTTP/2 stream window (16 MiB by default): anything bigger was UNKNOWN
    "Payload Too Large" while the same message with mm-vmodel-id passed. The window is set so
    that a message of MAX_REQUEST_BYTES fits, as the runtimes' max_receive_message_length
    lets it; over it, Envoy's 413 is mapped to RESOURCE_EXHAUSTED, the code gRPC itself gives
    a message over its limit."""
    h2 = protocol_pb2.Http2ProtocolOptions(initial_stream_window_size=wrappers_pb2.UInt32Value(value=MAX_REQUEST_BYTES + GRPC_FRAME_PREFIX))
    too_large = hcm.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(op=accesslog_pb2.ComparisonFilter.EQ, value=base_pb2.RuntimeUInt32(default_value=413, runtime_key="meshserve.grpc_too_large_status")),
        )),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=f"request message is larger than the {MAX_REQUEST_BYTES >> 20} MiB limit"),
        ),
        headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="grpc-status", value=GRPC_RESOURCE_EXHAUSTED))],
    )
    return h2, too_large


def build_listener(name: str, host: str, port: int, http2_only: bool) -> listener_pb2.Listener:
    manager = hcm.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm.HttpConnectionManager.HTTP2 if http2_only else hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=_ads(), route_config_name=name),
        http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
        max_request_headers_kb=wrappers_pb2.UInt32Value(value=96),
    )
    if not http2_only:
        manager.local_reply_config.CopyFrom(_json_errors())
        # HTTP/1.0 clients (ab, some load balancers' health checks, old SDKs) were refused with
        # 426. Envoy serves them over HTTP/1.1 upstream and closes after each response; the
        # default host is for those that send no Host header.
        manager.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions(accept_http_10=True, default_host_for_http_10="meshserve"))
    else:
        # gRPC clients that send no mm-vmodel-id / mm-model-id: route by the message's model_name.
        manager.http_filters.insert(0, lua_filter())
        h2, too_large = _grpc_limits()
        manager.http2_protocol_options.CopyFrom(h2)
        manager.local_reply_config.mappers.append(too_large)
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))]
            )
        ],
    )


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
