"""Envoy clusters and their endpoints (EDS). Pure: routing state in, protobuf out.

One cluster per runtime pod and protocol (`pod_<id>_rest`, `pod_<id>_grpc`), the activator's
two, one per transformer, and one pair per *copy set*: the distinct set of pods holding a model
with several copies (`pods_<a>+<b>_rest`). Envoy retries only within the cluster a route
picked, so a copy set's cluster is what lets a retry reach another copy when a pod dies. The
count follows pods and copy sets, never models (docs/design/routing.md).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, wrappers_pb2

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from meshserve_xds.pb import ads_source, pack_any
from meshserve_xds.resources import ACTIVATOR_GRPC, ACTIVATOR_REST, Endpoint, RoutingState

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def pod_cluster(pod: str, proto: str) -> str:
    return f"pod_{pod}_{proto}"


def transformer_cluster(name: str) -> str:
    return f"transformer_{name}_rest"


def copies_cluster(pods: list[str], proto: str) -> str:
    """The cluster a model's route names: its pod's own for one copy, else its copy set's."""
    pods = sorted(pods)
    return pod_cluster(pods[0], proto) if len(pods) == 1 else f"pods_{'+'.join(pods)}_{proto}"


def target_cluster(state: RoutingState, model: str, proto: str) -> str:
    """Where a model's traffic goes: its pod's or copy set's cluster, or the activator's when
    no pod holds it (the activator loads it and answers)."""
    pods = state.loaded.get(model)
    if pods:
        return copies_cluster(pods, proto)
    return ACTIVATOR_REST if proto == "rest" else ACTIVATOR_GRPC


def build_cluster(name: str, http2: bool) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration_pb2.Duration(nanos=250_000_000),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if http2:
        opts = hpo.HttpProtocolOptions(
            explicit_http_config=hpo.HttpProtocolOptions.ExplicitHttpConfig(http2_protocol_options=protocol_pb2.Http2ProtocolOptions())
        )
        c.typed_extension_protocol_options[HTTP_OPTIONS].CopyFrom(pack_any(opts))
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


def build_clusters(state: RoutingState, copy_sets: bool = True) -> tuple[dict[str, object], dict[str, object]]:
    """Pod, activator and transformer clusters and their endpoints; with `copy_sets`, also one
    pair per set of pods that holds a model with several copies (what routes name)."""
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


def serving(pods: "list[str] | tuple[str, ...]", endpoints: dict[str, Endpoint]) -> list[str]:
    """The pods of a copy set that take its traffic: all but the paused ones, unless all are.
    A paused pod accepts connections and answers nothing, so a request sent there waits for it
    to resume (outlier detection sees no error to eject it for). Its copies stay, and its own
    cluster still routes the models only it holds."""
    return [p for p in pods if not endpoints[p].paused] or list(pods)


def copy_sets_of(placements: Any, pods: dict[str, Endpoint]) -> set[tuple[str, ...]]:
    """The distinct sets of two or more known pods that hold a model: one cluster pair each."""
    return {tuple(sorted(ps)) for ps in placements if len(ps) > 1 and all(p in pods for p in ps)}


def build_copy_set(pods: tuple[str, ...], endpoints: dict[str, Endpoint]) -> tuple[dict[str, object], dict[str, object]]:
    """A copy set's REST and gRPC clusters and their endpoints (the set's pods)."""
    clusters: dict[str, object] = {}
    assignments: dict[str, object] = {}
    for proto, http2 in (("rest", False), ("grpc", True)):
        name = copies_cluster(list(pods), proto)
        addrs = [(endpoints[p].host, endpoints[p].grpc_port if http2 else endpoints[p].rest_port) for p in serving(pods, endpoints)]
        clusters[name] = build_copy_set_cluster(name, http2)
        assignments[name] = build_load_assignment(name, *addrs[0], *addrs[1:])
    return clusters, assignments
