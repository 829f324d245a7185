"""Traffic plans (meshserve/rules/plan.py) rendered as Envoy routes. Pure: data in, protobuf out.

How each piece maps to Envoy (docs/design/traffic.md has the why):
- A split is one `weighted_clusters` action with a ClusterWeight per target model: its pod's
  cluster, or its copy set's when it has several copies (clusters.copies_cluster).
  Envoy cannot rewrite the path per weighted cluster, so each ClusterWeight sets the
  `mm-model-id` header to its concrete model instead and the path keeps the name the client
  used. Runtimes pick the model from `mm-model-id` first (ModelMesh's convention, which the
  built-in runtime and the activator follow). A single-target branch keeps the plain route's
  path rewrite, so it works with any runtime.
- A target with no loaded copy is sent to the activator with its `mm-model-id`: the activator
  loads it and answers. Its share is never silently given to another model.
- Header branches (A/B) become a `RouteList` action in the name's matcher-tree entry: routes
  with header matchers in order, the default last. The tree lookup stays a hash lookup.
- Mirrors are `request_mirror_policies` with a runtime_fraction, to the shadow model's cluster
  (its pod's or its copy set's), each overriding `mm-model-id`; Envoy discards the
  shadow's answers.
- Sticky assignment hashes a request header (`hash_policy`) and has `weighted_clusters`
  pick its cluster with that hash (`use_hash_policy`), so one header value always lands on
  the same model while weights stay unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

from google.protobuf import duration_pb2, wrappers_pb2

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from meshserve_xds.clusters import target_cluster
from meshserve_xds.resources import MODELS_PREFIX, ROUTE_TIMEOUT_S, RoutingState
from meshserve_xds.routes import on_match_routes, route_action, set_model_header

# Weights are percents; each is spread over the model's pods, so scale up to keep integers exact.
WEIGHT_SCALE = 1000


def target_clusters(state: RoutingState, model: str, proto: str) -> list[str]:
    """The one cluster a target's traffic goes to: its pod's, or its copy set's when it has
    several copies (so a retry reaches another copy, as on the plain routes), or the
    activator's when no pod holds it."""
    return [target_cluster(state, model, proto)]


def _header_matcher(h: Any) -> rc.HeaderMatcher:
    m = rc.HeaderMatcher(name=h.name)
    if h.kind == "present":
        m.present_match = bool(h.value)
    elif h.kind == "regex":
        m.string_match.CopyFrom(string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=h.value)))
    else:
        m.string_match.CopyFrom(string_pb2.StringMatcher(**{h.kind: h.value}))
    return m


def _mirrors(state: RoutingState, mirror: tuple[str, float] | None, proto: str) -> list[rc.RouteAction.RequestMirrorPolicy]:
    if not mirror:
        return []
    model, percent = mirror
    clusters = target_clusters(state, model, proto)
    per = int(round(percent * 10_000 / 100 / len(clusters)))  # in 1/10,000ths, split among pods
    out = []
    for c in clusters:
        out.append(
            rc.RouteAction.RequestMirrorPolicy(
                cluster=c,
                runtime_fraction=base_pb2.RuntimeFractionalPercent(
                    default_value=percent_pb2.FractionalPercent(numerator=per, denominator=percent_pb2.FractionalPercent.TEN_THOUSAND)
                ),
                request_headers_mutations=[
                    mutation_rules_pb2.HeaderMutation(append=set_model_header(model)[0])
                ],
            )
        )
    return out


def _action(state: RoutingState, branch: Any, mirror: tuple[str, float] | None, proto: str,
            rewrite: Callable[[str], str] | None) -> tuple[rc.RouteAction, list[base_pb2.HeaderValueOption]]:
    """The action for one branch, plus route-level headers to add."""
    targets = [(m, w) for m, w in branch.targets if w > 0]
    route_headers: list[base_pb2.HeaderValueOption] = []
    if len(targets) == 1:
        model = targets[0][0]
        action = route_action(target_clusters(state, model, proto), ROUTE_TIMEOUT_S)
        if rewrite is not None:
            action.prefix_rewrite = rewrite(model)
        route_headers = set_model_header(model)
    else:
        action = route_action(["-"], ROUTE_TIMEOUT_S)  # the plain routes' retry policy: one source
        action.ClearField("cluster")
        weights = []
        for model, w in targets:
            clusters = target_clusters(state, model, proto)
            for c in clusters:
                weights.append(
                    rc.WeightedCluster.ClusterWeight(
                        name=c,
                        weight=wrappers_pb2.UInt32Value(value=max(1, w * WEIGHT_SCALE // len(clusters))),
                        request_headers_to_add=set_model_header(model),
                    )
                )
        wc = rc.WeightedCluster(clusters=weights)
        if branch.sticky_header:
            wc.use_hash_policy.value = True
            action.hash_policy.append(rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name=branch.sticky_header)))
        action.weighted_clusters.CopyFrom(wc)
    action.timeout.CopyFrom(duration_pb2.Duration(seconds=ROUTE_TIMEOUT_S))
    action.request_mirror_policies.extend(_mirrors(state, mirror, proto))
    return action, route_headers


def plan_routes(state: RoutingState, plan: Any, proto: str, match: Callable[[], rc.RouteMatch],
            rewrite: Callable[[str], str] | None) -> list[rc.Route]:
    out = []
    for b in plan.branches:
        m = match()
        m.headers.extend(_header_matcher(h) for h in b.headers)
        action, headers = _action(state, b, plan.mirror, proto, rewrite)
        out.append(rc.Route(match=m, route=action, request_headers_to_add=headers))
    return out


def add_rest_routes(state: RoutingState, exact: dict[str, Any], prefix: dict[str, Any]) -> None:
    """Replace (or add) the matcher-tree entries of every name that has a plan."""
    for name, plan in state.traffic.items():
        base = MODELS_PREFIX + name
        exact[base] = on_match_routes(
            plan_routes(state, plan, "rest", lambda: rc.RouteMatch(path=base), lambda m: MODELS_PREFIX + m)
        )
        prefix[base + "/"] = on_match_routes(
            plan_routes(state, plan, "rest", lambda: rc.RouteMatch(prefix=base + "/"), lambda m: MODELS_PREFIX + m + "/")
        )


def add_grpc_routes(state: RoutingState, by_alias: dict[str, Any]) -> None:
    for name, plan in state.traffic.items():
        by_alias[name] = on_match_routes(plan_routes(state, plan, "grpc", lambda: rc.RouteMatch(prefix="/"), None))
