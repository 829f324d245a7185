"""The routing model every layout builds from, and the names they share. Plain data, no Envoy.

`RoutingState` is what the gateway needs to know (pods, loaded copies, aliases, traffic plans,
transformers); `Resources` is what a layout gives the snapshot cache (type URL -> name ->
message). The Envoy builders live beside this, one module per kind of thing
(docs/design/routing.md, "Files"): clusters.py, routes.py, listeners.py, lua.py, openai.py;
the layouts (matcher.py, scoped.py, proxyless.py, behind layout.py's interface) put them
together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from meshserve.headers import MODEL_ID_HEADER, VMODEL_ID_HEADER

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
MODELS_PREFIX = "/v2/models/"
GRPC_PREFIX = "/inference.GRPCInferenceService/"
# gRPC server reflection (v1alpha and v1), what grpcurl and Postman ask before a call made
# without the .proto file: the activator answers it for the gateway, whatever model header the
# client sends with it (grpcurl's -H goes on its reflection calls too).
REFLECTION_PREFIX = "/grpc.reflection."
# The scoped layout's routing key: one header, set by the Lua filter (lua.py), keyed on by scopes.
KEY_HEADER = "x-ms-model"
NO_MODEL = "-"  # the key of a request that names no model
ROUTE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Endpoint:
    host: str
    rest_port: int
    grpc_port: int
    # Placement judged its pod paused (store keys.PAUSED): it takes a copy set's traffic only
    # when every pod of the set is paused.
    paused: bool = False


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
    # Shared routes (the scoped layout, docs/design/routing.md "Shared routes"): pods whose
    # runtime resolves an alias itself (Pod.resolves_names), and whether to use them
    # (Settings.xds_shared_routes)
    resolving: set[str] = field(default_factory=set)
    shared_routes: bool = False
    # alias -> model -> pods holding any copy of it (loading, loaded or unloading), for the
    # aliases that more than one model with a copy somewhere has (meshserve.model.alias_of_id):
    # where two share an alias on a pod, that pod's runtime cannot tell which one the alias
    # means, and the gateway rewrites it to the id
    contested: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)


@dataclass
class ListenerConfig:
    host: str = "127.0.0.1"
    rest_port: int = 8008
    grpc_port: int = 8033


@dataclass
class Resources:
    """type_url -> name -> message."""

    by_type: dict[str, dict[str, object]] = field(default_factory=dict)


def names_for(state: RoutingState) -> dict[str, list[str]]:
    """concrete id -> every name a client may use for it (itself and its aliases)."""
    names: dict[str, list[str]] = {m: [m] for m in state.loaded}
    for alias, model in state.aliases.items():
        if model in names:
            names[model].append(alias)
    return names


@dataclass
class Patch:
    """A change to a group's resources: per type, resources to add or replace (`upserts`),
    names to remove (`removes`), and types given whole (`replaces`: whatever the group holds
    of that type and is not in the table goes)."""

    upserts: dict[str, dict[str, object]] = field(default_factory=dict)
    removes: dict[str, list[str]] = field(default_factory=dict)
    replaces: dict[str, dict[str, object]] = field(default_factory=dict)


# Node groups (Envoy's node.cluster): gateways that share config share a group.
GATEWAY_GROUP = "meshserve-gateway"  # our own Envoy: listeners, routes, clusters, endpoints
ISTIO_GROUP = "meshserve-istio"  # a gateway whose listeners come from istiod: no listeners
PROXYLESS_GROUP = "meshserve-proxyless"  # grpcio's own xDS client: an api_listener, no gateway
GROUPS = (GATEWAY_GROUP, ISTIO_GROUP, PROXYLESS_GROUP)
