"""The scoped-RDS layout (the default; docs/design/routing.md): a change costs what it touched. Pure.

- Every request gets one routing key, the header `x-ms-model`, set by the scope-key Lua filter
  (lua.py). An `on_demand` filter after it holds a request whose scope names a
  RouteConfiguration the gateway has not received yet (a model that just loaded), instead of a
  404 (listeners.build_scoped_listener).
- One ScopedRouteConfiguration per model name (alias or concrete id), keyed on that name. A
  loaded model's scopes name its own small RouteConfiguration `model/<id>`; every cold name,
  and "-", names the shared `activator` one. A name with a traffic plan or a transformer names
  its own (scoped_routes.py builds each).
- Clusters and endpoints are the same as the matcher layout's: per pod and protocol, and per
  copy set (clusters.py).

Moving a model between pods changes one RouteConfiguration; loading or unloading it changes its
scopes (one or two). With delta xDS that is a few hundred bytes whatever the number of models.
Names nobody registered match no scope and get Envoy's 404.

`ScopedLayout` keeps an `Index` of what it last published and diffs the next state against it;
`diff_partial` does the same for a change known to touch only some models and names, in
O(change).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from meshserve_xds import fastpb
from meshserve_xds.clusters import build_clusters, build_copy_set, copies_cluster
from meshserve_xds.listeners import build_scoped_listener
from meshserve_xds.resources import (
    CLUSTER_TYPE, ENDPOINT_TYPE, GRPC, LISTENER_TYPE, REST, ROUTE_TYPE, SCOPED_ROUTE_TYPE, ListenerConfig, Patch, Resources,
    RoutingState, Transformer,
)
from meshserve_xds.scoped_routes import (
    ACTIVATOR_RC, activator_routes, loaded_routes, loaded_target, model_rc_name, model_routes, model_routes_wire, plan_models,
    scope, scope_name, scope_targets, scopes_wire, shared_routes, traffic_key, traffic_rc_name, traffic_routes,
    transformer_rc_name, transformer_routes, rc_pods,
)


def build_all(
    state: RoutingState, listeners: ListenerConfig, wire: bool = True, listener_table: dict[str, object] | None = None,
    targets: dict[str, str] | None = None,
) -> Resources:
    """Every resource of the gateway group, built whole (a start or a resync).

    With `wire` (the default) the scopes and the loaded models' RouteConfigurations come
    serialized from templates (fastpb: the same bytes as building the messages, which
    `wire=False` does, at a fraction of the cost: ~200,000 scopes at 100,000 registered
    models). They read as messages all the same (`fastpb.WireTable`). `targets` is
    `scope_targets(state)` when the caller has it already (`ScopedLayout.build_full`)."""
    # Pod clusters plus one per copy set: a model with several copies routes to its set's
    # cluster, so Envoy's retry of a refused or reset request reaches another copy.
    clusters, endpoints = build_clusters(state, copy_sets=True)
    res = Resources()
    res.by_type[CLUSTER_TYPE] = clusters
    res.by_type[ENDPOINT_TYPE] = endpoints
    res.by_type[LISTENER_TYPE] = listener_table if listener_table is not None else scoped_listeners(listeners)
    if targets is None:
        targets = scope_targets(state)
    # Only the loaded models' RouteConfigurations some scope names: with shared routes most
    # models have none of their own (scoped_routes.loaded_target).
    named = set(targets.values())
    own = [m for m in state.loaded if "model/" + m in named]
    if wire:
        res.by_type[SCOPED_ROUTE_TYPE] = _scopes_table(targets)
        table = model_routes_wire(state, own)
        routes = table.wire
    else:
        res.by_type[SCOPED_ROUTE_TYPE] = {scope_name(n): scope(n, t) for n, t in targets.items()}
        routes = {}
        for model in own:
            routes[model_rc_name(model)] = model_routes(state, model)
    for name in named:
        if name.startswith("pods/"):
            routes[name] = shared_routes(state, rc_pods(name))
    routes = {ACTIVATOR_RC: activator_routes(state), **routes}
    for name, plan in state.traffic.items():
        routes[traffic_rc_name(name)] = traffic_routes(state, name, plan)
    for name in state.transformers:
        routes[transformer_rc_name(name)] = transformer_routes(state, name)
    res.by_type[ROUTE_TYPE] = fastpb.WireTable(ROUTE_TYPE, route_pb2.RouteConfiguration, routes) if wire else routes
    return res


_templates: list[fastpb.Template | None] = []


def _scopes_table(targets: dict[str, str]) -> fastpb.WireTable:
    """`scopes_wire(targets)`, the same table in the same order, faster: the cold names'
    scopes (most of them: 1,900,001 of 2,000,001 at a million registered models) rendered in
    one loop (`Template.render_table`), the others one by one as scopes_wire does."""
    if not _templates:
        _templates.extend((fastpb.compile_checked(lambda n: scope(n, ACTIVATOR_RC), 1), fastpb.compile_checked(scope, 2)))
    act, both = _templates
    if act is None or both is None:  # not expected: the builder stopped fitting a template
        return scopes_wire(targets)
    render = both.render

    def other(n: str, t: str) -> object:
        b = render(n.encode(), t.encode())
        return b if b is not None else scope(n, t)

    out: dict[str, object] = {}
    act.render_table(targets.items(), out, "scope/", ACTIVATOR_RC, other)  # "scope/": scope_name()
    return fastpb.WireTable(SCOPED_ROUTE_TYPE, scoped_route_pb2.ScopedRouteConfiguration, out)


def scoped_listeners(lc: ListenerConfig) -> dict[str, object]:
    return {
        REST: build_scoped_listener(REST, lc.host, lc.rest_port, False),
        GRPC: build_scoped_listener(GRPC, lc.host, lc.grpc_port, True),
    }


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
    transformers: dict[str, Transformer] = field(default_factory=dict)
    # loaded models' RouteConfigurations (`model/<id>`, `pods/<pods>`) -> how many scopes name
    # it: one exists while a scope names it, created with the first and removed with the last
    refs: dict[str, int] = field(default_factory=dict)


def index(state: RoutingState, targets: dict[str, str] | None = None) -> Index:
    plans_of: dict[str, set[str]] = {}
    for name, plan in state.traffic.items():
        for m in plan_models(name, plan):
            plans_of.setdefault(m, set()).add(name)
    models = {m: tuple(sorted(pods)) for m, pods in state.loaded.items()}
    sets: dict[tuple[str, ...], int] = {}
    for pods in models.values():
        if len(pods) > 1:
            sets[pods] = sets.get(pods, 0) + 1
    if targets is None:
        targets = scope_targets(state)
    refs: dict[str, int] = {}
    for t in targets.values():
        if t.startswith(LOADED_RCS):
            refs[t] = refs.get(t, 0) + 1
    return Index(
        targets, models,
        {name: traffic_key(state, name, plan) for name, plan in state.traffic.items()}, plans_of, sets, dict(state.transformers), refs,
    )


LOADED_RCS = ("model/", "pods/")


def involves_traffic(idx: Index, models: set[str], names: set[str]) -> bool:
    """Does a change to `models` (placements, registrations) or `names` (scopes) touch a name
    with a traffic plan, or a model a plan sends traffic to or mirrors? O(change)."""
    return any(m in idx.plans_of for m in models) or any(n in idx.traffic or n in idx.plans_of for n in names)


def diff(old: Index, state: RoutingState) -> tuple[Patch, Index]:
    """Only the scopes and RouteConfigurations that changed. Comparing the indexes is a dict
    walk over the models; protobuf building, packing and sending follow the change."""
    new = index(state)
    p = Patch()
    scopes = p.upserts.setdefault(SCOPED_ROUTE_TYPE, {})
    for n, t in new.targets.items():
        if old.targets.get(n) != t:
            scopes[scope_name(n)] = scope(n, t)
    p.removes[SCOPED_ROUTE_TYPE] = [scope_name(n) for n in old.targets if n not in new.targets]
    routes = p.upserts.setdefault(ROUTE_TYPE, {ACTIVATOR_RC: activator_routes(state)})
    for name in new.refs:
        # New, or a model's own whose pods moved (a shared one depends on its name alone).
        if name not in old.refs or (name.startswith("model/") and old.models.get(name[6:]) != new.models.get(name[6:])):
            routes[name] = loaded_routes(state, name)
    p.removes[ROUTE_TYPE] = [name for name in old.refs if name not in new.refs]
    # A plan's RouteConfiguration is rebuilt when the plan changed or a model it names moved.
    for name, key in new.traffic.items():
        if old.traffic.get(name) != key:
            routes[traffic_rc_name(name)] = traffic_routes(state, name, state.traffic[name])
    p.removes[ROUTE_TYPE] += [traffic_rc_name(n) for n in old.traffic if n not in new.traffic]
    for name, t in new.transformers.items():
        if old.transformers.get(name) != t:
            routes[transformer_rc_name(name)] = transformer_routes(state, name)
    p.removes[ROUTE_TYPE] += [transformer_rc_name(n) for n in old.transformers if n not in new.transformers]
    return p, new


def diff_partial(old: Index, part: RoutingState, models: set[str], names: set[str]) -> Patch:
    """Like `diff`, for a change known to touch only `models` (their RouteConfigurations) and
    `names` (their scopes). `part` holds routing state for just those: the affected models'
    placements, the aliases of those models and the changed aliases, the registered ids among
    them. Cost follows the change. `old` is updated in place.

    Traffic plans are not looked at: a change that `involves_traffic` takes the full `diff`
    (the caller checks), so `old.traffic` and `old.plans_of` stay as they are. A copy set that
    a model starts routing to gets its clusters (`part.pods` has its pods' endpoints); one no
    model routes to any more loses them."""
    types = (CLUSTER_TYPE, ENDPOINT_TYPE, SCOPED_ROUTE_TYPE, ROUTE_TYPE)
    p = Patch(upserts={t: {} for t in types}, removes={t: [] for t in types})
    share = part.shared_routes and not part.route_stats
    for m in models:
        key = tuple(sorted(part.loaded[m])) if m in part.loaded else None
        before = old.models.get(m)
        if key is None:
            old.models.pop(m, None)  # its RouteConfiguration goes with the last scope naming it (below)
        elif before != key:
            old.models[m] = key
            if old.refs.get(model_rc_name(m)):
                p.upserts[ROUTE_TYPE][model_rc_name(m)] = model_routes(part, m)
        _move_set(old, p, part, before or (), key or ())
    for n in names:
        if n in old.transformers:
            continue  # a transformer's name keeps its scope whatever models do
        if n in part.aliases:
            m = part.aliases[n]
            target: str | None = ((loaded_target(part, n, m) if share else model_rc_name(m)) if m in part.loaded else ACTIVATOR_RC)
        elif n in part.loaded:
            target = loaded_target(part, n, n) if share else model_rc_name(n)
        elif n in part.registered or n in part.aliases.values():
            target = ACTIVATOR_RC
        else:
            target = None
        was = old.targets.get(n)
        if target == was:
            continue
        # The new target first: a RouteConfiguration both name is never dropped in between.
        if target is None:
            del old.targets[n]
            p.removes[SCOPED_ROUTE_TYPE].append(scope_name(n))
        else:
            old.targets[n] = target
            p.upserts[SCOPED_ROUTE_TYPE][scope_name(n)] = scope(n, target)
            _ref(old, p, part, target)
        if was is not None:
            _unref(old, p, was)
    return p


def _ref(idx: Index, p: Patch, part: RoutingState, rc_name: str) -> None:
    """One more scope names `rc_name`: the first brings the RouteConfiguration into the patch
    (`part` holds what it is built from: the model's pods, or the pods in its name)."""
    if not rc_name.startswith(LOADED_RCS):
        return
    n = idx.refs.get(rc_name, 0) + 1
    idx.refs[rc_name] = n
    if n == 1:
        p.upserts[ROUTE_TYPE][rc_name] = loaded_routes(part, rc_name)
        if rc_name in p.removes[ROUTE_TYPE]:
            p.removes[ROUTE_TYPE].remove(rc_name)


def _unref(idx: Index, p: Patch, rc_name: str) -> None:
    """One scope fewer names `rc_name`: the last one takes the RouteConfiguration away."""
    if not rc_name.startswith(LOADED_RCS) or rc_name not in idx.refs:
        return
    idx.refs[rc_name] -= 1
    if idx.refs[rc_name] <= 0:
        del idx.refs[rc_name]
        p.upserts[ROUTE_TYPE].pop(rc_name, None)
        p.removes[ROUTE_TYPE].append(rc_name)


def _move_set(idx: Index, p: Patch, part: RoutingState, was: tuple[str, ...], now: tuple[str, ...]) -> None:
    """One model stopped routing to copy set `was` and now routes to `now`: keep the counts,
    and add or remove the sets' clusters when a count leaves or reaches zero."""
    if was == now:
        return
    if len(now) > 1:
        idx.sets[now] = idx.sets.get(now, 0) + 1
        if idx.sets[now] == 1:
            clusters, endpoints = build_copy_set(now, part.pods)
            p.upserts[CLUSTER_TYPE].update(clusters)
            p.upserts[ENDPOINT_TYPE].update(endpoints)
    if len(was) > 1 and was in idx.sets:
        idx.sets[was] -= 1
        if idx.sets[was] <= 0:
            del idx.sets[was]
            names = [copies_cluster(list(was), proto) for proto in ("rest", "grpc")]
            p.removes[CLUSTER_TYPE] += names
            p.removes[ENDPOINT_TYPE] += names


class ScopedLayout:
    """The gateway group in the scoped layout: built whole at start and on a resync, patched
    after (only the scopes and RouteConfigurations that changed; clusters, endpoints and
    listeners, which follow pods and copy sets, replaced whole: the cache keeps what did not
    move)."""

    def __init__(self, listeners: ListenerConfig, group: str):
        self.listeners, self.group = listeners, group
        self.index: Index | None = None
        self._listeners: dict[str, object] | None = None

    def _listener_table(self) -> dict[str, object]:
        if self._listeners is None:  # they depend on the settings only
            self._listeners = scoped_listeners(self.listeners)
        return self._listeners

    def build_full(self, state: RoutingState) -> Resources:
        # One name -> target map for both: 2,000,001 entries at a million registered models,
        # a second one was 0.15 s of a 2.5 s build at 200,000 and its memory. The build only
        # reads it, so the index keeps it.
        targets = scope_targets(state)
        res = build_all(state, self.listeners, listener_table=self._listener_table(), targets=targets)
        self.index = index(state, targets)
        return res

    def apply_change(self, state: RoutingState) -> Resources | Patch:
        if self.index is None:
            return self.build_full(state)
        patch, self.index = diff(self.index, state)
        clusters, endpoints = build_clusters(state, copy_sets=True)
        patch.replaces = {CLUSTER_TYPE: clusters, ENDPOINT_TYPE: endpoints, LISTENER_TYPE: self._listener_table()}
        return patch

    def apply_partial(self, part: RoutingState, models: set[str], names: set[str]) -> Patch | None:
        """None when there is no index yet or the change touches a traffic plan: a plan's
        RouteConfiguration depends on every model it names, which the full diff rebuilds."""
        if self.index is None or involves_traffic(self.index, models, names):
            return None
        return diff_partial(self.index, part, models, names)
