"""Proxyless gRPC: resources for grpcio's own xDS client (an `xds:///meshserve` target), so a
gRPC client reaches the pod holding the model directly, with no gateway hop. Pure.

gRPC's xDS client understands classic routes with header matchers, not Envoy's matcher tree,
so the route table here is a list: one route per name a client may send in `mm-vmodel-id`
and one per concrete id in `mm-model-id`, then a catch-all to the activator. The list is
matched in the client, once per call; it is meant for services that use a bounded set of
models, while the gateway serves the long tail.
"""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import string_pb2
from meshserve_xds.clusters import build_cluster, pod_cluster, serving
from meshserve_xds.listeners import router
from meshserve_xds.pb import ads_source, pack_any
from meshserve_xds.resources import (
    ACTIVATOR_GRPC, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, MODEL_ID_HEADER, ROUTE_TYPE, VMODEL_ID_HEADER, Endpoint, Patch,
    Resources, RoutingState, names_for,
)

TARGET = "meshserve"  # clients dial xds:///meshserve
ROUTES = "meshserve_proxyless"


def _header_route(header: str, value: str, clusters: list[str]) -> rc.Route:
    action = rc.RouteAction()
    if len(clusters) == 1:
        action.cluster = clusters[0]
    else:
        action.weighted_clusters.CopyFrom(rc.WeightedCluster(
            clusters=[rc.WeightedCluster.ClusterWeight(name=c, weight=wrappers_pb2.UInt32Value(value=1)) for c in clusters]))
    return rc.Route(
        match=rc.RouteMatch(prefix="/", headers=[rc.HeaderMatcher(name=header, string_match=string_pb2.StringMatcher(exact=value))]),
        route=action,
    )


def build_routes(state: RoutingState) -> route_pb2.RouteConfiguration:
    routes = []
    for model, names in sorted(names_for(state).items()):
        clusters = [pod_cluster(p, "grpc") for p in serving(sorted(state.loaded[model]), state.pods)]
        routes.append(_header_route(MODEL_ID_HEADER, model, clusters))
        for name in names:
            routes.append(_header_route(VMODEL_ID_HEADER, name, clusters))
    routes.append(rc.Route(match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=ACTIVATOR_GRPC)))
    return route_pb2.RouteConfiguration(name=ROUTES, virtual_hosts=[rc.VirtualHost(name=TARGET, domains=["*"], routes=routes)])


def build_listener() -> listener_pb2.Listener:
    manager = hcm.HttpConnectionManager(
        rds=hcm.Rds(config_source=ads_source(), route_config_name=ROUTES),
        http_filters=[router()],
    )
    return listener_pb2.Listener(name=TARGET, api_listener=api_listener_pb2.ApiListener(api_listener=pack_any(manager)))


def _load_assignment(name: str, ep: Endpoint) -> endpoint_pb2.ClusterLoadAssignment:
    # gRPC ignores a locality without a weight.
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(region="meshserve"),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
        lb_endpoints=[endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ep.host, port_value=ep.grpc_port))))],
    )])


def build_all(state: RoutingState) -> Resources:
    targets = [(ACTIVATOR_GRPC, state.activator)] + [(pod_cluster(p, "grpc"), ep) for p, ep in state.pods.items()]
    res = Resources()
    res.by_type[CLUSTER_TYPE] = {n: build_cluster(n, http2=True) for n, _ in targets}
    res.by_type[ENDPOINT_TYPE] = {n: _load_assignment(n, ep) for n, ep in targets}
    res.by_type[LISTENER_TYPE] = {TARGET: build_listener()}
    res.by_type[ROUTE_TYPE] = {ROUTES: build_routes(state)}
    return res


class ProxylessLayout:
    """The proxyless group: a route list that grows with loaded models, built whole on every
    change (the cache keeps what did not move), and only once a client of it connected."""

    def __init__(self, group: str):
        self.group = group

    def build_full(self, state: RoutingState) -> Resources:
        return build_all(state)

    def apply_change(self, state: RoutingState) -> Resources | Patch:
        return build_all(state)

    def apply_partial(self, part: RoutingState, models: set[str], names: set[str]) -> Patch | None:
        return None
