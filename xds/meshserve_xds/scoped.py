"""The scoped-RDS layout (docs/design/routing.md): a change costs what it touched. Pure.

- Every request gets one routing key, the header `x-ms-model`, set by a small Lua filter from
  `mm-model-id`, `mm-vmodel-id`, the REST path `/v2/models/<name>`, or field 1 of a gRPC
  Model* request body; anything else gets "-". Envoy picks the scope again once the header is
  set. An `on_demand` filter after it holds a request whose scope names a RouteConfiguration
  the gateway has not received yet (a model that just loaded), instead of a 404.
- One ScopedRouteConfiguration per model name (alias or concrete id), keyed on that name. A
  loaded model's scopes name its own small RouteConfiguration `model/<id>` (one REST route
  that rewrites the name to the id, one gRPC route); every cold name, and "-", names the shared
  `activator` RouteConfiguration.
- A name with a traffic plan (TrafficRule, canary, version move; docs/design/traffic.md) names
  its own RouteConfiguration `traffic/<name>` instead, rendered by traffic.py: the plan's REST
  branches, its gRPC branches, then the activator. It is rebuilt when the plan changes or when
  a model the plan names (targets, mirror) moves.
- Clusters and endpoints are the same as the matcher layout's: one per pod and protocol.

Moving a model between pods changes one RouteConfiguration; loading or unloading it changes its
scopes (one or two). With delta xDS that is a few hundred bytes whatever the number of models.
Names nobody registered match no scope and get Envoy's 404.

A full build (`build_all`) renders the scopes and the loaded models' RouteConfigurations from
templates of `scope` and `model_routes` (fastpb.py): the same bytes, built several times
faster, which is what keeps a resync at 100,000 registered names under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from meshserve_xds import fastpb
from meshserve_xds import resources as r
from meshserve_xds import traffic as tr

KEY_HEADER = "x-ms-model"
NO_MODEL = "-"
SCOPES = "meshserve_scopes"
ACTIVATOR_RC = "activator"
GRPC_PREFIX = "/inference.GRPCInferenceService/"
# OpenAI-compatible endpoints (issue 17): the model is the JSON body's `model`.
OPENAI_PREFIX = "/v1/"
J2M_NAMESPACE = "envoy.filters.http.json_to_metadata"

LUA = f"""
local GRPC = "{GRPC_PREFIX}"

-- Field 1 of the first message in a gRPC request body (model_name / name), or nil.
local function field1(b)
  if #b < 7 or string.byte(b, 1) ~= 0 or string.byte(b, 6) ~= 10 then return nil end
  local len, mult, i = 0, 1, 7
  while true do
    local c = string.byte(b, i)
    if c == nil or mult > 2^28 then return nil end
    len = len + (c % 128) * mult
    i = i + 1
    if c < 128 then break end
    mult = mult * 128
  end
  if len == 0 or i + len - 1 > #b then return nil end
  return string.sub(b, i, i + len - 1)
end

function envoy_on_request(h)
  local hs = h:headers()
  if hs:get("{KEY_HEADER}") ~= nil then hs:remove("{KEY_HEADER}") end
  local path = hs:get(":path") or ""
  -- The REST path wins: a scope then pins segment 3 exactly, so one prefix route per name is
  -- enough (no "/v2/models/m1" matching "/v2/models/m10").
  local name = string.match(path, "^/v2/models/([^/?]+)")
  -- OpenAI-style requests name the model in the JSON body: json_to_metadata (before this
  -- filter, on /v1/ paths only) lifted it into dynamic metadata.
  if name == nil and string.sub(path, 1, 4) == "/v1/" then
    local md = h:streamInfo():dynamicMetadata():get("{J2M_NAMESPACE}")
    if md ~= nil and type(md["model"]) == "string" and md["model"] ~= "" then name = md["model"] end
  end
  if name == nil then name = hs:get("{r.MODEL_ID_HEADER}") or hs:get("{r.VMODEL_ID_HEADER}") end
  if name == nil and string.sub(path, 1, #GRPC + 5) == GRPC .. "Model" then
    local body = h:body()
    if body ~= nil then
      name = field1(body:getBytes(0, math.min(body:length(), 1035)))
      if name ~= nil then h:headers():add("{r.VMODEL_ID_HEADER}", name) end
    end
    hs = h:headers()  -- the handle taken before body() is stale once it returns
  end
  -- Setting the key clears the route cache: Envoy picks the scope again with it.
  hs:add("{KEY_HEADER}", name or "{NO_MODEL}")
end
"""


def _lua() -> hcm.HttpFilter:
    cfg = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=LUA), clear_route_cache=wrappers_pb2.BoolValue(value=True))
    return hcm.HttpFilter(name="envoy.filters.http.lua", typed_config=r._any(cfg))


def _json_to_metadata() -> hcm.HttpFilter:
    """The body's `model` into dynamic metadata, for the Lua filter to key the scope on. Only on
    /v1/ paths (a match_delegate skips it on every other request), so /v2 and gRPC bodies are
    never buffered or parsed: the filter holds a request until its whole body is in, which a
    large v2 tensor must not pay. Measured cost on /v1: docs/design/routing.md, "OpenAI"."""
    from envoy.extensions.common.matching.v3 import extension_matcher_pb2
    from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2
    from envoy.config.core.v3 import extension_pb2 as ext_core
    from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m
    from envoy.type.matcher.v3 import http_inputs_pb2
    from xds.core.v3 import extension_pb2
    from xds.type.matcher.v3 import matcher_pb2, string_pb2 as xstring_pb2

    rule = j2m.JsonToMetadata.Rule(
        selectors=[j2m.JsonToMetadata.Selector(key="model")],
        on_present=j2m.JsonToMetadata.KeyValuePair(key="model", type=j2m.JsonToMetadata.STRING),
    )
    # Any content type: `curl -d` says application/x-www-form-urlencoded, and such a request
    # would otherwise go the slow way (by the activator) every time. A body that isn't JSON sets
    # nothing and goes to the activator, which answers it in OpenAI's error shape.
    from envoy.type.matcher.v3 import regex_pb2

    cfg = j2m.JsonToMetadata(request_rules=j2m.JsonToMetadata.MatchRules(
        rules=[rule], allow_empty_content_type=True, allow_content_types_regex=regex_pb2.RegexMatcher(regex=".*")))
    pred = matcher_pb2.Matcher.MatcherList.Predicate
    not_v1 = pred(not_matcher=pred(single_predicate=pred.SinglePredicate(
        input=extension_pb2.TypedExtensionConfig(name="path", typed_config=r._any(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=":path"))),
        value_match=xstring_pb2.StringMatcher(prefix=OPENAI_PREFIX),
    )))
    skip = matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name="skip", typed_config=r._any(skip_action_pb2.SkipFilter())))
    wrapped = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=matcher_pb2.Matcher(matcher_list=matcher_pb2.Matcher.MatcherList(matchers=[
            matcher_pb2.Matcher.MatcherList.FieldMatcher(predicate=not_v1, on_match=skip)])),
        extension_config=ext_core.TypedExtensionConfig(name="envoy.filters.http.json_to_metadata", typed_config=r._any(cfg)),
    )
    return hcm.HttpFilter(name="meshserve.openai_model", typed_config=r._any(wrapped))


def _openai_errors() -> list[hcm.ResponseMapper]:
    """Envoy's own replies on /v1/ paths in OpenAI's error shape, which its clients parse: an
    unregistered `model` (no scope) is 404 model_not_found; anything else (no upstream, a
    timeout) keeps its status, with the reason as the message."""
    def mapper(extra: accesslog_pb2.AccessLogFilter | None, message: str, type_: str, code: str | None, param: str | None) -> hcm.ResponseMapper:
        on_v1 = accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(header=rc.HeaderMatcher(
            name=":path", string_match=string_pb2.StringMatcher(prefix=OPENAI_PREFIX))))
        flt = on_v1 if extra is None else accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=[on_v1, extra]))
        body = struct_pb2.Struct()
        body.update({"error": {"message": message, "type": type_, "param": param, "code": code}})
        return hcm.ResponseMapper(filter=flt, body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=body, content_type="application/json"))

    no_route = accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NR"]))
    server = accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=accesslog_pb2.ComparisonFilter(
        op=accesslog_pb2.ComparisonFilter.GE, value=base_pb2.RuntimeUInt32(default_value=500, runtime_key="meshserve.openai_server_error"))))
    return [
        mapper(no_route, f"The model '%REQ({KEY_HEADER})%' does not exist: no InferenceService or model is registered under this name",
               "invalid_request_error", "model_not_found", "model"),
        mapper(server, "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)", "server_error", None, None),
        mapper(None, "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)", "invalid_request_error", None, None),
    ]


def _on_demand() -> hcm.HttpFilter:
    """Holds a request whose scope names a RouteConfiguration Envoy has not received yet.

    Envoy applies a scope update at once and fetches the RouteConfiguration it names afterwards
    ("new RDS subscriptions created after listener warming up" are not waited for,
    scoped_rds.cc). A model that just loaded, or a name that just got a traffic plan, has a
    scope naming a RouteConfiguration new to the gateway: for one RDS round trip its requests
    would match no route and get a 404. With this filter such a request finds no route, asks
    for the scope's RouteConfiguration and continues once it arrived (the on-demand S/RDS
    path, which waits while the scope's config is still Envoy's empty placeholder). A request
    that has a route, or whose name has no scope, passes straight through."""
    return hcm.HttpFilter(name="envoy.filters.http.on_demand", typed_config=r._any(on_demand_pb2.OnDemand()))


def _scoped_routes() -> hcm.ScopedRoutes:
    frag = hcm.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder
    return hcm.ScopedRoutes(
        name=SCOPES,
        scope_key_builder=hcm.ScopedRoutes.ScopeKeyBuilder(fragments=[frag(header_value_extractor=frag.HeaderValueExtractor(name=KEY_HEADER, index=0))]),
        rds_config_source=r._ads(),
        scoped_rds=hcm.ScopedRds(scoped_rds_config_source=r._ads()),
    )


def build_listener(name: str, host: str, port: int, http2_only: bool) -> listener_pb2.Listener:
    """The matcher layout's listener with scoped routes and the key-setting Lua filter."""
    lst = r.build_listener(name, host, port, http2_only)
    manager = hcm.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(manager)
    manager.ClearField("rds")
    manager.scoped_routes.CopyFrom(_scoped_routes())
    del manager.http_filters[:]
    openai = [] if http2_only else [_json_to_metadata()]
    manager.http_filters.extend([*openai, _lua(), _on_demand(), hcm.HttpFilter(name="envoy.filters.http.router", typed_config=r._any(router_pb2.Router()))])
    # No scope: nobody registered that name. Say which, as the activator does in the other
    # layout: KServe v2 error JSON on REST, NOT_FOUND on gRPC (Envoy's own mapping of a local
    # 404 is UNIMPLEMENTED with no message, which reads as a missing method).
    message = f"model '%REQ({KEY_HEADER})%' not found: no InferenceService or model is registered under this name"
    no_route = accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NR"]))
    if http2_only:
        manager.local_reply_config.mappers.append(hcm.ResponseMapper(
            filter=no_route,
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(text_format_source=base_pb2.DataSource(inline_string=message)),
            headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="grpc-status", value="5"))],
        ))
    else:
        manager.local_reply_config.mappers.extend(_openai_errors())  # first: the first mapper that matches wins
        body = struct_pb2.Struct()
        body.update({"error": message})
        manager.local_reply_config.mappers.append(hcm.ResponseMapper(
            filter=no_route,
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(json_format=body, content_type="application/json"),
        ))
    lst.filter_chains[0].filters[0].typed_config.Pack(manager)
    return lst


def model_rc_name(model: str) -> str:
    return f"model/{model}"


def scope_name(name: str) -> str:
    return f"scope/{name}"


def scope(name: str, route_config: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    key = scoped_route_pb2.ScopedRouteConfiguration.Key
    return scoped_route_pb2.ScopedRouteConfiguration(
        name=scope_name(name), route_configuration_name=route_config, key=key(fragments=[key.Fragment(string_key=name)])
    )


# The model-name segment of a REST path; the Lua keys the scope on the same segment.
NAME_SEGMENT = r"^/v2/models/[^/?]+"


def model_routes(state: r.RoutingState, model: str) -> route_pb2.RouteConfiguration:
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
    grpc = r._route_action([r.copies_cluster(pods, "grpc")], 120)
    retry = grpc.retry_policy
    rest = r._route_action([r.copies_cluster(pods, "rest")], 120)
    rest.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=NAME_SEGMENT), substitution=r.MODELS_PREFIX + model))
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
    vh = rc.VirtualHost(name="model", domains=["*"], routes=routes, retry_policy=retry, request_headers_to_add=r._set_model_header(model))
    return route_pb2.RouteConfiguration(name=model_rc_name(model), virtual_hosts=[vh])


def _to_activator(state: r.RoutingState, cluster: str) -> rc.RouteAction:
    return rc.RouteAction(cluster=cluster, timeout=duration_pb2.Duration(seconds=int(state.cold_timeout_s)))


def activator_routes(state: r.RoutingState) -> route_pb2.RouteConfiguration:
    routes = [
        rc.Route(match=rc.RouteMatch(prefix=GRPC_PREFIX), route=_to_activator(state, r.ACTIVATOR_GRPC)),
        rc.Route(match=rc.RouteMatch(prefix="/"), route=_to_activator(state, r.ACTIVATOR_REST)),
    ]
    return route_pb2.RouteConfiguration(name=ACTIVATOR_RC, virtual_hosts=[rc.VirtualHost(name="activator", domains=["*"], routes=routes)])


def traffic_rc_name(name: str) -> str:
    return f"traffic/{name}"


def traffic_routes(state: r.RoutingState, name: str, plan: Any) -> route_pb2.RouteConfiguration:
    """A name governed by a traffic plan (rule, canary, version move): its own RouteConfiguration,
    rendered by traffic.py like the matcher layout's entry for the name, so there is one renderer.

    - REST: the plan's branches in order (header matches, then the default), each a prefix route
      on `/v2/models/<name>` (the scope pins segment 3, as in `model_routes`); a single-target
      branch rewrites the path to its model's id, a split sets `mm-model-id` per weighted cluster.
    - gRPC: the same branches on the gRPC prefix. A concrete id that has a plan is still pinned
      by `mm-model-id` (the Lua keys on it first): that header bypasses the plan, as it does in
      the matcher layout.
    - Anything else in this scope goes to the activator."""
    routes: list[rc.Route] = []
    if name not in state.aliases:
        pinned = rc.RouteMatch(prefix=GRPC_PREFIX, headers=[rc.HeaderMatcher(
            name=r.MODEL_ID_HEADER, string_match=string_pb2.StringMatcher(exact=name))])
        routes.append(rc.Route(stat_prefix=name, match=pinned, route=r._route_action(tr._clusters(state, name, "grpc"), 120),
                               request_headers_to_add=r._set_model_header(name)))
    base = r.MODELS_PREFIX + name
    routes += tr._routes(state, plan, "rest", lambda: rc.RouteMatch(prefix=base), lambda m: r.MODELS_PREFIX + m)
    routes += tr._routes(state, plan, "grpc", lambda: rc.RouteMatch(prefix=GRPC_PREFIX), None)
    routes.append(rc.Route(match=rc.RouteMatch(prefix="/"), route=_to_activator(state, r.ACTIVATOR_REST)))
    return route_pb2.RouteConfiguration(name=traffic_rc_name(name), virtual_hosts=[rc.VirtualHost(name="traffic", domains=["*"], routes=routes)])


def transformer_rc_name(name: str) -> str:
    return f"transformer/{name}"


def transformer_routes(state: r.RoutingState, name: str) -> route_pb2.RouteConfiguration:
    """An InferenceService with a transformer: its name's REST requests go to the transformer
    (resources.transformer_action). gRPC is not routed to it (a KServe transformer finds the
    model by the message's name, which the gateway can't rewrite): no route, NOT_FOUND."""
    routes = [rc.Route(stat_prefix=name, match=rc.RouteMatch(prefix=r.MODELS_PREFIX), route=r.transformer_action(state, name))]
    return route_pb2.RouteConfiguration(name=transformer_rc_name(name), virtual_hosts=[rc.VirtualHost(name="transformer", domains=["*"], routes=routes)])


def plan_models(name: str, plan: Any) -> set[str]:
    """Every model whose placement shapes `plan`'s RouteConfiguration: its targets, its mirror,
    and the name itself when it is a concrete id (the pinned gRPC route)."""
    return plan.models() | {name}


def _traffic_key(state: r.RoutingState, name: str, plan: Any) -> tuple:
    """What a plan's RouteConfiguration is built from: the plan itself, whether the name is an
    alias, and the pods of every model it names. Equal keys, equal RouteConfigurations."""
    placed = tuple((m, tuple(sorted(state.loaded.get(m, ())))) for m in sorted(plan_models(name, plan)))
    return (tuple(plan.branches), plan.mirror, name in state.aliases, placed)


def scope_targets(state: r.RoutingState) -> dict[str, str]:
    """name -> the RouteConfiguration its scope names: the model's own when loaded, else the
    activator's. Every registered name gets one, so a cold model still loads on demand. A name
    with a traffic plan names the plan's own RouteConfiguration instead."""
    targets = {NO_MODEL: ACTIVATOR_RC}
    targets.update(dict.fromkeys(state.registered, ACTIVATOR_RC))
    loaded = state.loaded
    for alias, model in state.aliases.items():
        targets[alias] = "model/" + model if model in loaded else ACTIVATOR_RC  # model_rc_name(), inlined
        if model not in targets:
            targets[model] = ACTIVATOR_RC
    for model in loaded:
        targets[model] = "model/" + model
    for name in state.traffic:
        targets[name] = traffic_rc_name(name)
    for name in state.transformers:
        targets[name] = transformer_rc_name(name)
    return targets


def build_all(state: r.RoutingState, listeners: r.ListenerConfig, wire: bool = True) -> r.Resources:
    """Every resource of the gateway group.

    With `wire` (the default) the scopes and the loaded models' RouteConfigurations come
    serialized from templates (fastpb: the same bytes as building the messages, which
    `wire=False` does, at a fraction of the cost: ~200,000 scopes at 100,000 registered
    models). They read as messages all the same (`fastpb.WireTable`)."""
    # Pod clusters plus one per copy set: a model with several copies routes to its set's
    # cluster, so Envoy's retry of a refused or reset request reaches another copy.
    clusters, endpoints = r.build_clusters(state, copy_sets=True)
    res = r.Resources()
    res.by_type[r.CLUSTER_TYPE] = clusters
    res.by_type[r.ENDPOINT_TYPE] = endpoints
    res.by_type[r.LISTENER_TYPE] = {
        r.REST: build_listener(r.REST, listeners.host, listeners.rest_port, False),
        r.GRPC: build_listener(r.GRPC, listeners.host, listeners.grpc_port, True),
    }
    if wire:
        res.by_type[r.SCOPED_ROUTE_TYPE] = scopes_wire(scope_targets(state))
        table = model_routes_wire(state, state.loaded)
        routes = table.wire
    else:
        res.by_type[r.SCOPED_ROUTE_TYPE] = {scope_name(n): scope(n, t) for n, t in scope_targets(state).items()}
        routes = {}
        for model in state.loaded:
            routes[model_rc_name(model)] = model_routes(state, model)
    routes = {ACTIVATOR_RC: activator_routes(state), **routes}
    for name, plan in state.traffic.items():
        routes[traffic_rc_name(name)] = traffic_routes(state, name, plan)
    for name in state.transformers:
        routes[transformer_rc_name(name)] = transformer_routes(state, name)
    res.by_type[r.ROUTE_TYPE] = fastpb.WireTable(r.ROUTE_TYPE, route_pb2.RouteConfiguration, routes) if wire else routes
    return res


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
    return fastpb.WireTable(r.SCOPED_ROUTE_TYPE, scoped_route_pb2.ScopedRouteConfiguration, out)


def _model_template(state: r.RoutingState, pods: int) -> fastpb.Template | None:
    """`model_routes` with the id and `pods` pods (sorted) open: the pods only appear in cluster
    names, so one template serves every pod set of that size."""
    def build(model: str, *held: str) -> route_pb2.RouteConfiguration:
        return model_routes(replace(state, loaded={model: list(held)}), model)

    return fastpb.compile_checked(build, 1 + pods)


def model_routes_wire(state: r.RoutingState, models: Iterable[str]) -> fastpb.WireTable:
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
    return fastpb.WireTable(r.ROUTE_TYPE, route_pb2.RouteConfiguration, out)


@dataclass
class Index:
    """What the last publish held, to diff the next one against: name -> RouteConfiguration
    its scope names, per loaded model the pods its RouteConfiguration was built from, per name
    with a traffic plan what the plan's RouteConfiguration was built from, and the reverse
    map model -> plan names that name it (so a change can tell in O(change) that it touches
    a plan)."""

    targets: dict[str, str] = field(default_factory=dict)
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)  # loaded model -> its pods, sorted
    traffic: dict[str, tuple] = field(default_factory=dict)
    plans_of: dict[str, set[str]] = field(default_factory=dict)
    # copy set (pods holding a model with several copies) -> how many models route to it; its
    # clusters exist while that is above zero
    sets: dict[tuple[str, ...], int] = field(default_factory=dict)
    transformers: dict[str, r.Transformer] = field(default_factory=dict)


@dataclass
class Patch:
    """type_url -> resources to add or replace, and names to remove."""

    upserts: dict[str, dict[str, object]] = field(default_factory=dict)
    removes: dict[str, list[str]] = field(default_factory=dict)


def index(state: r.RoutingState) -> Index:
    plans_of: dict[str, set[str]] = {}
    for name, plan in state.traffic.items():
        for m in plan_models(name, plan):
            plans_of.setdefault(m, set()).add(name)
    models = {m: tuple(sorted(pods)) for m, pods in state.loaded.items()}
    sets: dict[tuple[str, ...], int] = {}
    for pods in models.values():
        if len(pods) > 1:
            sets[pods] = sets.get(pods, 0) + 1
    return Index(
        scope_targets(state), models,
        {name: _traffic_key(state, name, plan) for name, plan in state.traffic.items()}, plans_of, sets, dict(state.transformers),
    )


def involves_traffic(idx: Index, models: set[str], names: set[str]) -> bool:
    """Does a change to `models` (placements, registrations) or `names` (scopes) touch a name
    with a traffic plan, or a model a plan sends traffic to or mirrors? O(change)."""
    return any(m in idx.plans_of for m in models) or any(n in idx.traffic or n in idx.plans_of for n in names)


def diff(old: Index, state: r.RoutingState) -> tuple[Patch, Index]:
    """Only the scopes and RouteConfigurations that changed. Comparing the indexes is a dict
    walk over the models; protobuf building, packing and sending follow the change."""
    new = index(state)
    p = Patch()
    scopes = p.upserts.setdefault(r.SCOPED_ROUTE_TYPE, {})
    for n, t in new.targets.items():
        if old.targets.get(n) != t:
            scopes[scope_name(n)] = scope(n, t)
    p.removes[r.SCOPED_ROUTE_TYPE] = [scope_name(n) for n in old.targets if n not in new.targets]
    routes = p.upserts.setdefault(r.ROUTE_TYPE, {ACTIVATOR_RC: activator_routes(state)})
    for m, key in new.models.items():
        if old.models.get(m) != key:
            routes[model_rc_name(m)] = model_routes(state, m)
    p.removes[r.ROUTE_TYPE] = [model_rc_name(m) for m in old.models if m not in new.models]
    # A plan's RouteConfiguration is rebuilt when the plan changed or a model it names moved.
    for name, key in new.traffic.items():
        if old.traffic.get(name) != key:
            routes[traffic_rc_name(name)] = traffic_routes(state, name, state.traffic[name])
    p.removes[r.ROUTE_TYPE] += [traffic_rc_name(n) for n in old.traffic if n not in new.traffic]
    for name, t in new.transformers.items():
        if old.transformers.get(name) != t:
            routes[transformer_rc_name(name)] = transformer_routes(state, name)
    p.removes[r.ROUTE_TYPE] += [transformer_rc_name(n) for n in old.transformers if n not in new.transformers]
    return p, new


def diff_partial(old: Index, part: r.RoutingState, models: set[str], names: set[str]) -> Patch:
    """Like `diff`, for a change known to touch only `models` (their RouteConfigurations) and
    `names` (their scopes). `part` holds routing state for just those: the affected models'
    placements, the aliases of those models and the changed aliases, the registered ids among
    them. Cost follows the change. `old` is updated in place.

    Traffic plans are not looked at: a change that `involves_traffic` takes the full `diff`
    (the caller checks), so `old.traffic` and `old.plans_of` stay as they are. A copy set that
    a model starts routing to gets its clusters (`part.pods` has its pods' endpoints); one no
    model routes to any more loses them."""
    types = (r.CLUSTER_TYPE, r.ENDPOINT_TYPE, r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE)
    p = Patch(upserts={t: {} for t in types}, removes={t: [] for t in types})
    for m in models:
        key = tuple(sorted(part.loaded[m])) if m in part.loaded else None
        before = old.models.get(m)
        if key is None:
            if old.models.pop(m, None) is not None:
                p.removes[r.ROUTE_TYPE].append(model_rc_name(m))
        elif before != key:
            old.models[m] = key
            p.upserts[r.ROUTE_TYPE][model_rc_name(m)] = model_routes(part, m)
        _move_set(old, p, part, before or (), key or ())
    for n in names:
        if n in old.transformers:
            continue  # a transformer's name keeps its scope whatever models do
        if n in part.aliases:
            target: str | None = model_rc_name(part.aliases[n]) if part.aliases[n] in part.loaded else ACTIVATOR_RC
        elif n in part.loaded:
            target = model_rc_name(n)
        elif n in part.registered or n in part.aliases.values():
            target = ACTIVATOR_RC
        else:
            target = None
        if target is None:
            if old.targets.pop(n, None) is not None:
                p.removes[r.SCOPED_ROUTE_TYPE].append(scope_name(n))
        elif old.targets.get(n) != target:
            old.targets[n] = target
            p.upserts[r.SCOPED_ROUTE_TYPE][scope_name(n)] = scope(n, target)
    return p


def _move_set(idx: Index, p: Patch, part: r.RoutingState, was: tuple[str, ...], now: tuple[str, ...]) -> None:
    """One model stopped routing to copy set `was` and now routes to `now`: keep the counts,
    and add or remove the sets' clusters when a count leaves or reaches zero."""
    if was == now:
        return
    if len(now) > 1:
        idx.sets[now] = idx.sets.get(now, 0) + 1
        if idx.sets[now] == 1:
            clusters, endpoints = r.build_copy_set(now, part.pods)
            p.upserts[r.CLUSTER_TYPE].update(clusters)
            p.upserts[r.ENDPOINT_TYPE].update(endpoints)
    if len(was) > 1 and was in idx.sets:
        idx.sets[was] -= 1
        if idx.sets[was] <= 0:
            del idx.sets[was]
            names = [r.copies_cluster(list(was), proto) for proto in ("rest", "grpc")]
            p.removes[r.CLUSTER_TYPE] += names
            p.removes[r.ENDPOINT_TYPE] += names
