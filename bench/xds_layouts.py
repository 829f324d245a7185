"""Candidate routing layouts for the REST listener, measured by bench/xds_routing.py.

Each layout is pure: routing state in, Envoy resources out, plus `changed()`, the resources a
one-model placement change touches (what an incremental control plane would re-send).

- matcher:   one RouteConfiguration, a VirtualHost.matcher tree (today's production layout).
- srds:      scoped RDS; the scope key is the model name, cut from `:path`; one small
             RouteConfiguration per model.
- srds_shared: scoped RDS where a scope points at a RouteConfiguration shared by every model
             on the same set of pods (no per-model rewrite or header: needs runtimes that
             accept the alias in the path), to see what the scopes alone cost.
- cluster:   a stable matcher tree that sends each model to its own EDS cluster; a placement
             change is an EDS update (priority 0: pods, priority 1: the activator).
- subset:    one cluster for all pods with subset load balancing (`list_as_any`): each endpoint
             lists the models it holds; header_to_metadata copies the model name from `:path`.
- vhds:      one RouteConfiguration whose virtual hosts come on demand by VHDS, keyed by a
             header (`vhost_header`). Nothing in Envoy's stock filters can copy the name from
             `:path` into that header before routing, so it is measured with clients sending
             the model name in a header (as gRPC clients send mm-vmodel-id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from google.protobuf import duration_pb2, struct_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2 as h2m
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import regex_pb2
from xds.type.matcher.v3 import matcher_pb2
from meshserve_xds import routes as rt
from meshserve_xds import listeners, matcher, pb
from meshserve_xds import clusters as cl
from meshserve_xds import resources as r

SCOPED_ROUTE_TYPE = r.SCOPED_ROUTE_TYPE
VHOST_TYPE = r.VHOST_TYPE
MODEL_HEADER = "x-ms-model"


@dataclass
class Layout:
    name: str
    delta: bool
    build: Callable[[r.RoutingState, int], r.Resources]
    # state, port, model -> type_url -> name -> resource: what one model's placement change touches
    changed: Callable[[r.RoutingState, int, str], dict[str, dict[str, object]]]
    # headers a client sends; the model name is in the path for every layout but vhds
    headers: Callable[[str], dict[str, str]] = lambda name: {}


def _listener(port: int, manager: hcm.HttpConnectionManager, extra_filters: list[hcm.HttpFilter] = ()) -> listener_pb2.Listener:  # type: ignore[assignment]
    manager.stat_prefix = r.REST
    manager.codec_type = hcm.HttpConnectionManager.AUTO
    for f in extra_filters:
        manager.http_filters.append(f)
    manager.http_filters.append(hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pb.pack_any(router_pb2.Router())))
    return listener_pb2.Listener(
        name=r.REST,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=pb.pack_any(manager))])],
    )


def _rest_clusters(state: r.RoutingState) -> tuple[dict[str, object], dict[str, object]]:
    clusters, endpoints = cl.build_clusters(state)
    keep = {n for n in clusters if n.endswith("_rest")}
    return {n: c for n, c in clusters.items() if n in keep}, {n: e for n, e in endpoints.items() if n in keep}


def _names(state: r.RoutingState) -> dict[str, list[str]]:
    return r.names_for(state)


# -- matcher: today's layout ---------------------------------------------------------------

def matcher_build(state: r.RoutingState, port: int) -> r.Resources:
    clusters, endpoints = _rest_clusters(state)
    res = r.Resources()
    res.by_type[r.CLUSTER_TYPE] = clusters
    res.by_type[r.ENDPOINT_TYPE] = endpoints
    res.by_type[r.LISTENER_TYPE] = {r.REST: listeners.build_listener(r.REST, "127.0.0.1", port, False)}
    res.by_type[r.ROUTE_TYPE] = {r.REST: matcher.build_rest_routes(state)}
    return res


def matcher_changed(state: r.RoutingState, port: int, model: str) -> dict[str, dict[str, object]]:
    return {r.ROUTE_TYPE: {r.REST: matcher.build_rest_routes(state)}}


# -- srds: scoped RDS keyed on the model name ---------------------------------------------

def _srds_manager() -> hcm.HttpConnectionManager:
    frag = hcm.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder
    ext = frag.HeaderValueExtractor
    # "/v2/models/<name>/infer" split on "/" is ["", "v2", "models", "<name>", "infer"].
    key = hcm.ScopedRoutes.ScopeKeyBuilder(fragments=[
        frag(header_value_extractor=ext(name=":path", element_separator="/", index=2)),
        frag(header_value_extractor=ext(name=":path", element_separator="/", index=3)),
    ])
    return hcm.HttpConnectionManager(
        scoped_routes=hcm.ScopedRoutes(
            name="meshserve_rest_scopes",
            scope_key_builder=key,
            rds_config_source=pb.ads_source(),
            scoped_rds=hcm.ScopedRds(scoped_rds_config_source=pb.ads_source()),
        )
    )


def srds_route(state: r.RoutingState, model: str) -> route_pb2.RouteConfiguration:
    clusters = [cl.pod_cluster(p, "rest") for p in sorted(state.loaded[model])]
    action = rt.route_action(clusters, 120)
    # The scope already pinned segment 3 to one of this model's names: rewrite it to the id.
    action.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex="^/v2/models/[^/]+"), substitution=r.MODELS_PREFIX + model))
    route = rc.Route(match=rc.RouteMatch(prefix=r.MODELS_PREFIX), route=action, request_headers_to_add=rt.set_model_header(model))
    return route_pb2.RouteConfiguration(name=f"rest:{model}", virtual_hosts=[rc.VirtualHost(name="m", domains=["*"], routes=[route])])


def srds_scope(name: str, model: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    Key = scoped_route_pb2.ScopedRouteConfiguration.Key
    return scoped_route_pb2.ScopedRouteConfiguration(
        name=f"rest:{name}", route_configuration_name=f"rest:{model}",
        key=Key(fragments=[Key.Fragment(string_key="models"), Key.Fragment(string_key=name)]),
    )


def srds_build(state: r.RoutingState, port: int) -> r.Resources:
    clusters, endpoints = _rest_clusters(state)
    res = r.Resources()
    res.by_type[r.CLUSTER_TYPE] = clusters
    res.by_type[r.ENDPOINT_TYPE] = endpoints
    res.by_type[r.LISTENER_TYPE] = {r.REST: _listener(port, _srds_manager())}
    scopes: dict[str, object] = {}
    routes: dict[str, object] = {}
    for model, names in _names(state).items():
        routes[f"rest:{model}"] = srds_route(state, model)
        for n in names:
            scopes[f"rest:{n}"] = srds_scope(n, model)
    res.by_type[SCOPED_ROUTE_TYPE] = scopes
    res.by_type[r.ROUTE_TYPE] = routes
    return res


def srds_changed(state: r.RoutingState, port: int, model: str) -> dict[str, dict[str, object]]:
    return {r.ROUTE_TYPE: {f"rest:{model}": srds_route(state, model)}}


# -- srds_shared: scopes point at one RouteConfiguration per set of pods ----------------------

def _podset(state: r.RoutingState, model: str) -> str:
    return "+".join(sorted(state.loaded[model]))


def shared_route(state: r.RoutingState, pods: str) -> route_pb2.RouteConfiguration:
    action = rt.route_action([cl.pod_cluster(p, "rest") for p in pods.split("+")], 120)
    route = rc.Route(match=rc.RouteMatch(prefix=r.MODELS_PREFIX), route=action)
    return route_pb2.RouteConfiguration(name=f"rest:pods:{pods}", virtual_hosts=[rc.VirtualHost(name="m", domains=["*"], routes=[route])])


def shared_scope(name: str, pods: str) -> scoped_route_pb2.ScopedRouteConfiguration:
    s = srds_scope(name, "")
    s.route_configuration_name = f"rest:pods:{pods}"
    return s


def srds_shared_build(state: r.RoutingState, port: int) -> r.Resources:
    res = srds_build(r.RoutingState(pods=state.pods, loaded={}, aliases={}, activator=state.activator), port)
    scopes: dict[str, object] = {}
    routes: dict[str, object] = {}
    for model, names in _names(state).items():
        ps = _podset(state, model)
        routes.setdefault(f"rest:pods:{ps}", shared_route(state, ps))
        for n in names:
            scopes[f"rest:{n}"] = shared_scope(n, ps)
    res.by_type[SCOPED_ROUTE_TYPE] = scopes
    res.by_type[r.ROUTE_TYPE] = routes
    return res


def _names_of(state: r.RoutingState, model: str) -> list[str]:
    """The bench names each model `m<i>__isvc-...` with alias `m<i>`: O(1), where a reverse
    scan of the aliases would make the change cost O(models) in the bench itself."""
    alias = model.split("__", 1)[0]
    return [model, alias] if state.aliases.get(alias) == model else [model]


def srds_shared_changed(state: r.RoutingState, port: int, model: str) -> dict[str, dict[str, object]]:
    ps = _podset(state, model)
    return {
        r.ROUTE_TYPE: {f"rest:pods:{ps}": shared_route(state, ps)},
        SCOPED_ROUTE_TYPE: {f"rest:{n}": shared_scope(n, ps) for n in _names_of(state, model)},
    }


# -- cluster: a cluster per model, placement changes are EDS updates -----------------------

def model_cluster(model: str) -> str:
    return f"model_{model}"


def cluster_routes(state: r.RoutingState) -> route_pb2.RouteConfiguration:
    exact: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    prefix: dict[str, matcher_pb2.Matcher.OnMatch] = {}
    for model, names in _names(state).items():
        action = rc.RouteAction(cluster=model_cluster(model), timeout=duration_pb2.Duration(seconds=120))
        for name in names:
            base = r.MODELS_PREFIX + name
            a1 = rc.RouteAction()
            a1.CopyFrom(action)
            a1.prefix_rewrite = r.MODELS_PREFIX + model
            exact[base] = rt.on_match_route(rc.Route(match=rc.RouteMatch(path=base), route=a1))
            a2 = rc.RouteAction()
            a2.CopyFrom(action)
            a2.prefix_rewrite = r.MODELS_PREFIX + model + "/"
            prefix[base + "/"] = rt.on_match_route(rc.Route(match=rc.RouteMatch(prefix=base + "/"), route=a2))
    fallback = rt.on_match_route(rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=r.ACTIVATOR_REST)))
    m = rt.header_tree(":path", "exact_match_map", exact, matcher_pb2.Matcher.OnMatch(matcher=rt.header_tree(":path", "prefix_match_map", prefix, fallback)))
    return route_pb2.RouteConfiguration(name=r.REST, virtual_hosts=[rc.VirtualHost(name="models", domains=["*"], matcher=m)])


def cluster_cla(state: r.RoutingState, model: str) -> endpoint_pb2.ClusterLoadAssignment:
    def lb(ep: r.Endpoint) -> endpoint_components_pb2.LbEndpoint:
        return endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ep.host, port_value=ep.rest_port))))

    return endpoint_pb2.ClusterLoadAssignment(cluster_name=model_cluster(model), endpoints=[
        endpoint_components_pb2.LocalityLbEndpoints(priority=0, lb_endpoints=[lb(state.pods[p]) for p in sorted(state.loaded[model])]),
        endpoint_components_pb2.LocalityLbEndpoints(priority=1, lb_endpoints=[lb(state.activator)]),
    ])


def cluster_build(state: r.RoutingState, port: int) -> r.Resources:
    res = r.Resources()
    clusters = {r.ACTIVATOR_REST: cl.build_cluster(r.ACTIVATOR_REST, False)}
    endpoints: dict[str, object] = {r.ACTIVATOR_REST: cl.build_load_assignment(r.ACTIVATOR_REST, state.activator.host, state.activator.rest_port)}
    for model in state.loaded:
        clusters[model_cluster(model)] = cl.build_cluster(model_cluster(model), False)
        endpoints[model_cluster(model)] = cluster_cla(state, model)
    res.by_type[r.CLUSTER_TYPE] = clusters  # type: ignore[assignment]
    res.by_type[r.ENDPOINT_TYPE] = endpoints
    res.by_type[r.LISTENER_TYPE] = {r.REST: listeners.build_listener(r.REST, "127.0.0.1", port, False)}
    res.by_type[r.ROUTE_TYPE] = {r.REST: cluster_routes(state)}
    return res


def cluster_changed(state: r.RoutingState, port: int, model: str) -> dict[str, dict[str, object]]:
    return {r.ENDPOINT_TYPE: {model_cluster(model): cluster_cla(state, model)}}


# -- subset: one cluster, endpoints list their models ---------------------------------------

RUNTIME = "runtime_rest"


def subset_cla(state: r.RoutingState) -> endpoint_pb2.ClusterLoadAssignment:
    names = _names(state)
    held: dict[str, list[str]] = {p: [] for p in state.pods}
    for model, pods in state.loaded.items():
        for p in pods:
            held[p].extend(names[model])
    eps = []
    for p, ep in sorted(state.pods.items()):
        md = struct_pb2.Struct()
        md.update({"model": held[p]})
        eps.append(endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ep.host, port_value=ep.rest_port))),
            metadata=base_pb2.Metadata(filter_metadata={"envoy.lb": md}),
        ))
    amd = struct_pb2.Struct()
    amd.update({"model": "__activator"})
    eps.append(endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=state.activator.host, port_value=state.activator.rest_port))),
        metadata=base_pb2.Metadata(filter_metadata={"envoy.lb": amd}),
    ))
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=RUNTIME, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)])


def subset_build(state: r.RoutingState, port: int) -> r.Resources:
    c = cl.build_cluster(RUNTIME, False)
    default = struct_pb2.Struct()
    default.update({"model": "__activator"})
    c.lb_subset_config.CopyFrom(cluster_pb2.Cluster.LbSubsetConfig(
        fallback_policy=cluster_pb2.Cluster.LbSubsetConfig.DEFAULT_SUBSET,
        default_subset=default,
        subset_selectors=[cluster_pb2.Cluster.LbSubsetConfig.LbSubsetSelector(keys=["model"])],
        list_as_any=True,
    ))
    rule = h2m.Config.Rule(header=":path", on_header_present=h2m.Config.KeyValuePair(
        metadata_namespace="envoy.lb", key="model",
        regex_value_rewrite=regex_pb2.RegexMatchAndSubstitute(pattern=regex_pb2.RegexMatcher(regex="^/v2/models/([^/]+).*$"), substitution="\\1"),
    ))
    h2m_filter = hcm.HttpFilter(name="envoy.filters.http.header_to_metadata", typed_config=pb.pack_any(h2m.Config(request_rules=[rule])))
    route = rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=RUNTIME, timeout=duration_pb2.Duration(seconds=120)))
    manager = hcm.HttpConnectionManager(route_config=route_pb2.RouteConfiguration(name=r.REST, virtual_hosts=[rc.VirtualHost(name="all", domains=["*"], routes=[route])]))
    res = r.Resources()
    res.by_type[r.CLUSTER_TYPE] = {RUNTIME: c}
    res.by_type[r.ENDPOINT_TYPE] = {RUNTIME: subset_cla(state)}
    res.by_type[r.LISTENER_TYPE] = {r.REST: _listener(port, manager, [h2m_filter])}
    res.by_type[r.ROUTE_TYPE] = {}
    return res


def subset_changed(state: r.RoutingState, port: int, model: str) -> dict[str, dict[str, object]]:
    return {r.ENDPOINT_TYPE: {RUNTIME: subset_cla(state)}}


# -- vhds: virtual hosts on demand, keyed by a header ---------------------------------------

def vhds_vhost(state: r.RoutingState, model: str, name: str) -> rc.VirtualHost:
    clusters = [cl.pod_cluster(p, "rest") for p in sorted(state.loaded[model])]
    action = rt.route_action(clusters, 120)
    action.regex_rewrite.CopyFrom(regex_pb2.RegexMatchAndSubstitute(pattern=regex_pb2.RegexMatcher(regex="^/v2/models/[^/]+"), substitution=r.MODELS_PREFIX + model))
    route = rc.Route(match=rc.RouteMatch(prefix="/"), route=action, request_headers_to_add=rt.set_model_header(model))
    # VHDS names a virtual host `<route config>/<domain>`.
    return rc.VirtualHost(name=f"{r.REST}/{name}", domains=[name], routes=[route])


def vhds_build(state: r.RoutingState, port: int) -> r.Resources:
    clusters, endpoints = _rest_clusters(state)
    rcfg = route_pb2.RouteConfiguration(
        name=r.REST, vhost_header=MODEL_HEADER, virtual_hosts=[],
        vhds=route_pb2.Vhds(config_source=pb.ads_source()),
    )
    # No "*" virtual host: it would answer every name and VHDS would never be asked, so a
    # cold model needs a VHDS answer pointing at the activator (one per registered name).
    od = hcm.HttpFilter(name="envoy.filters.http.on_demand", typed_config=pb.pack_any(on_demand_pb2.OnDemand()))
    manager = hcm.HttpConnectionManager(rds=hcm.Rds(config_source=pb.ads_source(), route_config_name=r.REST))
    res = r.Resources()
    res.by_type[r.CLUSTER_TYPE] = clusters
    res.by_type[r.ENDPOINT_TYPE] = endpoints
    res.by_type[r.LISTENER_TYPE] = {r.REST: _listener(port, manager, [od])}
    res.by_type[r.ROUTE_TYPE] = {r.REST: rcfg}
    vhosts: dict[str, object] = {}
    for model, names in _names(state).items():
        for n in names:
            vhosts[f"{r.REST}/{n}"] = vhds_vhost(state, model, n)
    res.by_type[VHOST_TYPE] = vhosts
    return res


def vhds_changed(state: r.RoutingState, port: int, model: str) -> dict[str, dict[str, object]]:
    return {VHOST_TYPE: {f"{r.REST}/{n}": vhds_vhost(state, model, n) for n in _names_of(state, model)}}


LAYOUTS = {
    "matcher": Layout("matcher", False, matcher_build, matcher_changed),
    "srds": Layout("srds", True, srds_build, srds_changed),
    "srds_shared": Layout("srds_shared", True, srds_shared_build, srds_shared_changed),
    "cluster": Layout("cluster", True, cluster_build, cluster_changed),
    "subset": Layout("subset", True, subset_build, subset_changed),
    "vhds": Layout("vhds", True, vhds_build, vhds_changed, headers=lambda name: {MODEL_HEADER: name}),
}
