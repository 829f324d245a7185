"""The scoped layout's resources, one builder each (scoped.py puts them together). Pure.

- `scope(name, target)`: the ScopedRouteConfiguration keyed on one model name (alias or id).
- `model_routes`: a loaded model's RouteConfiguration `model/<id>`, to its pods.
- `activator_routes`: the shared `activator` one, for every cold name and "-".
- `traffic_routes`: a name with a traffic plan, `traffic/<name>` (rendered by traffic.py).
- `transformer_routes`: an InferenceService with a transformer, `transformer/<name>`.

`scopes_wire` and `model_routes_wire` give the first two serialized, from templates of these
builders (fastpb.py): the same bytes, built several times faster, which is what keeps a full
build at 100,000 registered names under a second (docs/design/routing.md, "Full build").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from meshserve_xds import fastpb
from meshserve_xds.clusters import copies_cluster
from meshserve_xds.openai import OPENAI_PREFIX
from meshserve.model import alias_of_id
from meshserve_xds.resources import (
    ACTIVATOR_GRPC, ACTIVATOR_REST, GRPC_PREFIX, KEY_HEADER, MODEL_ID_HEADER, MODELS_PREFIX, NO_MODEL, REFLECTION_PREFIX, ROUTE_TIMEOUT_S, ROUTE_TYPE,
    SCOPED_ROUTE_TYPE, RoutingState,
)
from meshserve_xds.routes import NAME_SEGMENT, activator_action, route_action, set_model_header, streaming, streaming_routes, transformer_action
from meshserve_xds.traffic import plan_routes, target_clusters

ACTIVATOR_RC = "activator"
# The scope key the Lua filter set (lua.py): what the shared RouteConfiguration tells the runtime.
KEY_VALUE = "%REQ(" + KEY_HEADER + ")%"


def model_rc_name(model: str) -> str:
    return f"model/{model}"


def pods_rc_name(pods: Iterable[str]) -> str:
    """The RouteConfiguration every model on exactly these pods shares (pod ids never hold '+')."""
    return "pods/" + "+".join(sorted(pods))


def rc_pods(name: str) -> list[str]:
    """`pods_rc_name`'s pods back."""
    return name[5:].split("+")


def loaded_target(state: RoutingState, name: str, model: str) -> str:
    """The RouteConfiguration the scope of `name` (the loaded `model`'s id or an alias of it)
    names: its pod set's shared one when every pod of it finds the model by that name itself
    (docs/design/routing.md "Shared routes"), else the model's own, which rewrites the name to
    the id. By id: any name-resolving pod holding it. By alias: the alias must be the one the
    model's id was made for (what the loader told the runtime) and no other model with a copy on
    one of those pods may have it (a rollout's old and new version: the runtime would serve the
    one it loaded first, and the alias may already mean the other)."""
    pods = state.loaded[model]
    if not state.shared_routes or state.route_stats or not all(p in state.resolving for p in pods):
        return "model/" + model  # model_rc_name(), inlined
    if name != model:
        if alias_of_id(model) != name:
            return "model/" + model
        rivals = state.contested.get(name)
        if rivals and any(m != model and any(p in on for p in pods) for m, on in rivals.items()):
            return "model/" + model
    return "pods/" + "+".join(pods if len(pods) == 1 else sorted(pods))  # pods_rc_name(), inlined


def shared_routes(state: RoutingState, pods: list[str]) -> route_pb2.RouteConfiguration:
    """`pods/<pods>`: what `model_routes` is, for every model held by exactly these pods and
    reached by a name their runtime resolves: no rewrite (the path keeps the name the client
    used), and `mm-model-id` set to the scope key, the name the scope was picked by, whichever
    way the request named it (path, header, gRPC message, /v1 body)."""
    pods = sorted(pods)
    grpc = route_action([copies_cluster(pods, "grpc")], ROUTE_TIMEOUT_S)
    retry = grpc.retry_policy
    rest = streaming(route_action([copies_cluster(pods, "rest")], ROUTE_TIMEOUT_S))
    routes = [rc.Route(match=rc.RouteMatch(prefix=GRPC_PREFIX), route=grpc), rc.Route(match=rc.RouteMatch(prefix="/"), route=rest)]
    for rt in routes:
        rt.route.ClearField("retry_policy")
    vh = rc.VirtualHost(name="pods", domains=["*"], routes=routes, retry_policy=retry, request_headers_to_add=set_model_header(KEY_VALUE))
    return route_pb2.RouteConfiguration(name=pods_rc_name(pods), virtual_hosts=[vh])


def loaded_routes(state: RoutingState, name: str) -> route_pb2.RouteConfiguration:
    """A loaded model's RouteConfiguration by name: `model/<id>` or `pods/<pods>`."""
    if name.startswith("pods/"):
        return shared_routes(state, rc_pods(name))
    return model_routes(state, name[len("model/"):])


def scope_name(name: str) -> str:
    return f"scope/{name}"


def scope(name: str, route_config: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    key = scoped_route_pb2.ScopedRouteConfiguration.Key
    return scoped_route_pb2.ScopedRouteConfiguration(
        name=scope_name(name), route_configuration_name=route_config, key=key(fragments=[key.Fragment(string_key=name)])
    )


def model_routes(state: RoutingState, model: str) -> route_pb2.RouteConfiguration:
    """A loaded model: two routes, gRPC to its pods' gRPC ports and REST (v2, and /v1 OpenAI-style)
    with a v2 path's name segment rewritten to its id, whatever name the request used.

    Any name: a scope reaches this RouteConfiguration only through a name of this model (the
    scope is keyed on it), so one REST route serves them all, and aliases coming and going
    never change it: it depends on the id and the pods alone. It also
    holds while an alias moves to another model: Envoy may apply the scope's new target before
    this RouteConfiguration, and per-name routes would then miss the alias and answer 404
    (e2e/test_rollout.py, a version move under load, fails none).

    Lean on purpose: one of these per loaded model is most of the gateway's memory at 10^5
    names. The `mm-model-id` header and the retry policy sit on the virtual host, once, and
    per-route stats (`stat_prefix`) are only there when `route_stats` asks for them. Measured
    at 20,000 loaded of 100,000 registered: 1,034 MiB with four routes each carrying all three,
    723-727 MiB like this (docs/design/routing.md, "Memory")."""
    pods = sorted(state.loaded[model])
    stat = model if state.route_stats else ""
    grpc = route_action([copies_cluster(pods, "grpc")], ROUTE_TIMEOUT_S)
    retry = grpc.retry_policy
    # Bounding the gaps, not the whole answer (routes.streaming): this one route carries /v1,
    # whose generations stream for longer than ROUTE_TIMEOUT_S. v2 on it gets the same bound
    # for a one-piece answer (and MLServer's generate_stream streams unbounded too).
    rest = streaming(route_action([copies_cluster(pods, "rest")], ROUTE_TIMEOUT_S))
    rest.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=NAME_SEGMENT), substitution=MODELS_PREFIX + model))
    # The REST route takes any path, not only /v2/models/: OpenAI-style requests (/v1/embeddings,
    # keyed on the body's model) go to the same pods as they are (the rewrite touches only a v2
    # path), and the runtime finds the model by the mm-model-id header the virtual host sets.
    # One route rather than a third per loaded model: these are most of the gateway's memory.
    routes = [
        rc.Route(stat_prefix=stat, match=rc.RouteMatch(prefix=GRPC_PREFIX), route=grpc),
        rc.Route(stat_prefix=stat, match=rc.RouteMatch(prefix="/"), route=rest),
    ]
    for rt in routes:
        rt.route.ClearField("retry_policy")
    vh = rc.VirtualHost(name="model", domains=["*"], routes=routes, retry_policy=retry, request_headers_to_add=set_model_header(model))
    return route_pb2.RouteConfiguration(name=model_rc_name(model), virtual_hosts=[vh])


def activator_routes(state: RoutingState) -> route_pb2.RouteConfiguration:
    routes = [
        rc.Route(match=rc.RouteMatch(prefix=GRPC_PREFIX), route=activator_action(state, ACTIVATOR_GRPC)),
        rc.Route(match=rc.RouteMatch(prefix=REFLECTION_PREFIX), route=activator_action(state, ACTIVATOR_GRPC)),
        # A cold /v1 answer is relayed as the pod streams it: bounded by its gaps, as a warm one.
        rc.Route(match=rc.RouteMatch(prefix=OPENAI_PREFIX), route=streaming(activator_action(state, ACTIVATOR_REST))),
        rc.Route(match=rc.RouteMatch(prefix="/"), route=activator_action(state, ACTIVATOR_REST)),
    ]
    return route_pb2.RouteConfiguration(name=ACTIVATOR_RC, virtual_hosts=[rc.VirtualHost(name="activator", domains=["*"], routes=routes)])


def traffic_rc_name(name: str) -> str:
    return f"traffic/{name}"


def traffic_routes(state: RoutingState, name: str, plan: Any) -> route_pb2.RouteConfiguration:
    """A name governed by a traffic plan (rule, canary, version move): its own RouteConfiguration,
    rendered by traffic.py like the matcher layout's entry for the name, so there is one renderer.

    - REST: the plan's branches in order (header matches, then the default), each a prefix route
      on `/v2/models/<name>` (the scope pins segment 3, as in `model_routes`); a single-target
      branch rewrites the path to its model's id, a split sets `mm-model-id` per weighted cluster.
    - gRPC: the same branches on the gRPC prefix. A concrete id that has a plan is still pinned
      by `mm-model-id` (the Lua keys on it first): that header bypasses the plan, as it does in
      the matcher layout.
    - /v1/ (OpenAI, routed by the body's `model`): the same branches, path untouched.
    - Anything else in this scope goes to the activator."""
    routes: list[rc.Route] = []
    if name not in state.aliases:
        pinned = rc.RouteMatch(prefix=GRPC_PREFIX, headers=[rc.HeaderMatcher(
            name=MODEL_ID_HEADER, string_match=string_pb2.StringMatcher(exact=name))])
        routes.append(rc.Route(stat_prefix=name, match=pinned, route=route_action(target_clusters(state, name, "grpc"), ROUTE_TIMEOUT_S),
                               request_headers_to_add=set_model_header(name)))
    base = MODELS_PREFIX + name
    routes += plan_routes(state, plan, "rest", lambda: rc.RouteMatch(prefix=base), lambda m: MODELS_PREFIX + m)
    routes += plan_routes(state, plan, "grpc", lambda: rc.RouteMatch(prefix=GRPC_PREFIX), None)
    # OpenAI-style requests (the scope came from the body's `model`): the same split, the path as it came.
    routes += streaming_routes(plan_routes(state, plan, "rest", lambda: rc.RouteMatch(prefix=OPENAI_PREFIX), None))
    routes.append(rc.Route(match=rc.RouteMatch(prefix="/"), route=activator_action(state, ACTIVATOR_REST)))
    return route_pb2.RouteConfiguration(name=traffic_rc_name(name), virtual_hosts=[rc.VirtualHost(name="traffic", domains=["*"], routes=routes)])


def transformer_rc_name(name: str) -> str:
    return f"transformer/{name}"


def transformer_routes(state: RoutingState, name: str) -> route_pb2.RouteConfiguration:
    """An InferenceService with a transformer: its name's REST requests go to the transformer
    (resources.transformer_action). gRPC is not routed to it (a KServe transformer finds the
    model by the message's name, which the gateway can't rewrite): no route, NOT_FOUND."""
    routes = [rc.Route(stat_prefix=name, match=rc.RouteMatch(prefix=MODELS_PREFIX), route=transformer_action(state, name))]
    return route_pb2.RouteConfiguration(name=transformer_rc_name(name), virtual_hosts=[rc.VirtualHost(name="transformer", domains=["*"], routes=routes)])


def plan_models(name: str, plan: Any) -> set[str]:
    """Every model whose placement shapes `plan`'s RouteConfiguration: its targets, its mirror,
    and the name itself when it is a concrete id (the pinned gRPC route)."""
    return plan.models() | {name}


def traffic_key(state: RoutingState, name: str, plan: Any) -> tuple:
    """What a plan's RouteConfiguration is built from: the plan itself, whether the name is an
    alias, and the pods of every model it names. Equal keys, equal RouteConfigurations."""
    placed = tuple((m, tuple(sorted(state.loaded.get(m, ())))) for m in sorted(plan_models(name, plan)))
    return (tuple(plan.branches), plan.mirror, name in state.aliases, placed)


def scope_targets(state: RoutingState) -> dict[str, str]:
    """name -> the RouteConfiguration its scope names: when loaded, the model's own or its pod
    set's shared one (`loaded_target`), else the activator's. Every registered name gets one, so a cold model still loads on demand. A name
    with a traffic plan names the plan's own RouteConfiguration instead."""
    targets = {NO_MODEL: ACTIVATOR_RC}
    targets.update(dict.fromkeys(state.registered, ACTIVATOR_RC))
    loaded = state.loaded
    share = state.shared_routes and not state.route_stats
    for alias, model in state.aliases.items():
        if model in loaded:
            targets[alias] = loaded_target(state, alias, model) if share else "model/" + model  # model_rc_name(), inlined
        else:
            targets[alias] = ACTIVATOR_RC
        if model not in targets:
            targets[model] = ACTIVATOR_RC
    for model in loaded:
        targets[model] = loaded_target(state, model, model) if share else "model/" + model
    for name in state.traffic:
        targets[name] = traffic_rc_name(name)
    for name in state.transformers:
        targets[name] = transformer_rc_name(name)
    return targets


# Templates (fastpb), each checked against its builder when made: a scope is `scope(name,
# route_config)` with both strings spliced in (and one with the shared activator's name fixed,
# for most scopes); a loaded model's RouteConfiguration is `model_routes` for one number of
# copies, with the id and the pods spliced in.
_scope_templates: dict[str, fastpb.Template | None] = {}
_MISSING: Any = object()


def _scope_template(target: str) -> fastpb.Template | None:
    """The scope template with `target` fixed, or both strings open for ""."""
    tpl = _scope_templates.get(target, _MISSING)
    if tpl is _MISSING:
        tpl = _scope_templates[target] = (
            fastpb.compile_checked(lambda n: scope(n, target), 1) if target else fastpb.compile_checked(scope, 2))
    return tpl


def scopes_wire(targets: dict[str, str]) -> fastpb.WireTable:
    """`scope(name, target)` for every name -> target, serialized: scope name -> bytes, the
    same bytes as serializing `scope(name, target)` (a name whose scope a template cannot
    render, the empty one, stays a message)."""
    both, act = _scope_template(""), _scope_template(ACTIVATOR_RC)
    out: dict[str, object] = {}
    if both is None or act is None:  # not expected: the builder stopped fitting a template
        for n, t in targets.items():
            out[scope_name(n)] = scope(n, t)
    else:
        render, render_act = both.render, act.render
        for n, t in targets.items():
            b = render_act(n.encode()) if t == ACTIVATOR_RC else render(n.encode(), t.encode())
            out["scope/" + n] = b if b is not None else scope(n, t)  # scope_name(), inlined
    return fastpb.WireTable(SCOPED_ROUTE_TYPE, scoped_route_pb2.ScopedRouteConfiguration, out)


def _model_template(state: RoutingState, pods: int) -> fastpb.Template | None:
    """`model_routes` with the id and `pods` pods (sorted) open: the pods only appear in cluster
    names, so one template serves every pod set of that size."""
    def build(model: str, *held: str) -> route_pb2.RouteConfiguration:
        return model_routes(replace(state, loaded={model: list(held)}), model)

    return fastpb.compile_checked(build, 1 + pods)


def model_routes_wire(state: RoutingState, models: Iterable[str]) -> fastpb.WireTable:
    """`model_routes` for each of `models` (loaded), serialized: RouteConfiguration name ->
    bytes, from one template per number of copies."""
    templates: dict[int, fastpb.Template | None] = {}
    out: dict[str, object] = {}
    loaded = state.loaded
    for model in models:
        pods = loaded[model]
        n = len(pods)
        tpl = templates.get(n, _MISSING)
        if tpl is _MISSING:
            tpl = templates[n] = _model_template(state, n)
        b = None
        if tpl is not None:
            b = tpl.render(model.encode(), *[p.encode() for p in (sorted(pods) if n > 1 else pods)])
        out["model/" + model] = b if b is not None else model_routes(state, model)  # model_rc_name(), inlined
    return fastpb.WireTable(ROUTE_TYPE, route_pb2.RouteConfiguration, out)
