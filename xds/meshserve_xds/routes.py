"""Envoy route pieces every layout uses: actions, the model header, matcher-tree entries.
Pure: plain data in, protobuf out."""

from __future__ import annotations

from google.protobuf import duration_pb2, wrappers_pb2

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import http_inputs_pb2, regex_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from meshserve_xds.clusters import transformer_cluster
from meshserve_xds.pb import pack_any
from meshserve_xds.resources import MODEL_ID_HEADER, MODELS_PREFIX, RoutingState

# The model-name segment of a REST path (the scoped layout's Lua keys the scope on the same one).
NAME_SEGMENT = r"^/v2/models/[^/?]+"


def route_action(clusters: list[str], timeout_s: float) -> rc.RouteAction:
    """To one cluster (or spread evenly over several), retrying a refused or reset request."""
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
                name="envoy.retry_host_predicates.previous_hosts", typed_config=pack_any(previous_hosts_pb2.PreviousHostsPredicate()),
            )],
            host_selection_retry_max_attempts=5,
        )
    )
    return action


def streaming(action: rc.RouteAction) -> rc.RouteAction:
    """`action` bounding the gaps in a response instead of the whole of it (OpenAI's /v1): a
    generation streams for as long as it takes while its pieces keep coming, and a one-piece
    answer keeps the bound it had (nothing comes until it does). Envoy answers a stream idle
    timeout with 408; the listeners map that back to the route timeout's 504 (STREAM_IDLE)."""
    action.idle_timeout.CopyFrom(action.timeout)
    action.timeout.CopyFrom(duration_pb2.Duration())  # 0: no bound on the whole response
    return action


def streaming_routes(routes: list[rc.Route]) -> list[rc.Route]:
    for r in routes:
        streaming(r.route)
    return routes


def activator_action(state: RoutingState, cluster: str) -> rc.RouteAction:
    """To the activator, with a timeout that covers a cold start."""
    return rc.RouteAction(cluster=cluster, timeout=duration_pb2.Duration(seconds=int(state.cold_timeout_s)))


def set_model_header(model_id: str) -> list[base_pb2.HeaderValueOption]:
    """`mm-model-id: <id>`, replacing any the client sent: runtimes pick the model by it."""
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=MODEL_ID_HEADER, value=model_id),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    ]


def transformer_action(state: RoutingState, name: str) -> rc.RouteAction:
    """To the transformer, with the name segment of the path rewritten to the name it serves.
    Its timeout covers the predictor's cold start, which happens behind it."""
    t = state.transformers[name]
    action = rc.RouteAction(cluster=transformer_cluster(name), timeout=duration_pb2.Duration(seconds=int(max(120, state.cold_timeout_s + 30))))
    action.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=NAME_SEGMENT), substitution=MODELS_PREFIX + t.predictor))
    return action


def on_match_route(route: rc.Route) -> matcher_pb2.Matcher.OnMatch:
    """A matcher-tree entry that takes one route."""
    return matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name="route", typed_config=pack_any(route)))


def on_match_routes(routes: list[rc.Route]) -> matcher_pb2.Matcher.OnMatch:
    """A matcher-tree entry that tries `routes` in order (header branches), or takes the one."""
    if len(routes) == 1 and not routes[0].match.headers:
        return on_match_route(routes[0])
    return matcher_pb2.Matcher.OnMatch(
        action=extension_pb2.TypedExtensionConfig(name="routes", typed_config=pack_any(rc.RouteList(routes=routes)))
    )


def header_tree(header: str, kind: str, entries: dict[str, matcher_pb2.Matcher.OnMatch], on_no_match: matcher_pb2.Matcher.OnMatch) -> matcher_pb2.Matcher:
    """A map lookup (`kind`: exact_match_map or prefix_match_map) on one header, falling through
    to `on_no_match`. Envoy requires a map to be non-empty, so an empty one collapses into its
    fallback."""
    if not entries:
        return on_no_match.matcher if on_no_match.HasField("matcher") else matcher_pb2.Matcher(on_no_match=on_no_match)
    tree = matcher_pb2.Matcher.MatcherTree(input=extension_pb2.TypedExtensionConfig(
        name="header", typed_config=pack_any(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header))))
    target = getattr(tree, kind)
    for k, v in entries.items():
        target.map[k].CopyFrom(v)
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=on_no_match)
