"""The Envoy bootstrap for a meshserve gateway: an admin port and our xDS server, nothing else.
Every listener, route, cluster and endpoint comes over ADS. In a cluster it also gets a static
metrics listener that serves only GET /stats/prometheus from the (loopback) admin API, so
Prometheus can scrape the gateway Envoy without reaching the admin API itself.

`python -m meshserve_xds.bootstrap OUT NODE_ID` writes the gateway bootstrap from the settings
(MESHSERVE_HOST, _XDS_PORT, _ENVOY_ADMIN_PORT, _ENVOY_METRICS_HOST/_PORT, _XDS_TLS_*): the
gateway pod's init container runs it (istio/gateway.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf import json_format, duration_pb2, wrappers_pb2

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.metrics.v3 import stats_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as route_rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from meshserve_xds import clusters, listeners, pb
from meshserve_xds import resources as r
from meshserve_xds.resources import GATEWAY_GROUP, ISTIO_GROUP, PROXYLESS_GROUP

if TYPE_CHECKING:
    from meshserve.settings import Settings

XDS_CLUSTER = "meshserve_xds"
METRICS_LISTENER = "meshserve_prometheus"
ADMIN_CLUSTER = "meshserve_envoy_admin"
PROMETHEUS_PATH = "/stats/prometheus"


@dataclass(frozen=True)
class XdsClientTls:
    """How an xDS client dials the server over mutual TLS: PEM file paths (the bootstrap names
    the files, it never holds key material) and the name the server's certificate must carry."""

    ca: str  # the CA the server's certificate must chain to
    cert: str  # the client's own certificate (chain), signed by the CA the server trusts
    key: str
    server_name: str = "meshserve-xds"  # SNI, and a DNS SAN the server's certificate must have

    @classmethod
    def from_settings(cls, s: "Settings") -> "XdsClientTls | None":
        """None when xDS runs in plaintext (no MESHSERVE_XDS_TLS_* set)."""
        if not s.xds_tls:
            return None
        return cls(ca=s.xds_tls_ca, cert=s.xds_tls_client_cert or s.xds_tls_cert, key=s.xds_tls_client_key or s.xds_tls_key,
                   server_name=s.xds_tls_server_name)


def gateway_bootstrap(
    node_id: str, xds_host: str, xds_port: int, admin_port: int, group: str = GATEWAY_GROUP, delta: bool = True,
    tls: XdsClientTls | None = None, metrics: tuple[str, int] | None = None,
) -> str:
    """`delta=True` (the default) speaks incremental xDS (DeltaAggregatedResources): a change
    sends only the resources that changed, which is what keeps a change small at 100,000 models.
    The scoped layout needs it: in state-of-the-world a scope change re-sends every scope and a
    route change every RouteConfiguration the gateway holds. `delta=False` is SotW. `tls` dials
    the xDS server over mutual TLS (the server must be started with MESHSERVE_XDS_TLS_*).
    `metrics` (host, port) adds the static listener serving only GET /stats/prometheus."""
    b = _bootstrap(node_id, xds_host, xds_port, admin_port, group, delta, tls)
    if metrics is not None:
        add_metrics_listener(b, metrics[0], metrics[1], admin_port)
    return json_format.MessageToJson(b)


def add_metrics_listener(b: bootstrap_pb2.Bootstrap, host: str, port: int, admin_port: int) -> None:
    """A static listener on host:port whose only route is GET /stats/prometheus (exact path, the
    query string aside) to the admin API on loopback; anything else gets a 404 from the listener
    itself and never reaches the admin API (config_dump, /clusters, POST /quitquitquit...). As
    Istio's sidecar does on :15090. Its names can't clash with what ADS sends (meshserve_*)."""
    admin = cluster_pb2.Cluster(
        name=ADMIN_CLUSTER, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=clusters.build_load_assignment(ADMIN_CLUSTER, "127.0.0.1", admin_port),
    )
    get = route_rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact="GET"))
    routes = route_pb2.RouteConfiguration(name=METRICS_LISTENER, virtual_hosts=[route_rc.VirtualHost(
        name=METRICS_LISTENER, domains=["*"], routes=[
            route_rc.Route(match=route_rc.RouteMatch(path=PROMETHEUS_PATH, headers=[get]),
                           route=route_rc.RouteAction(cluster=ADMIN_CLUSTER, timeout=duration_pb2.Duration(seconds=10))),
            route_rc.Route(match=route_rc.RouteMatch(prefix="/"), direct_response=route_rc.DirectResponseAction(
                status=404, body=base_pb2.DataSource(inline_string=f"only GET {PROMETHEUS_PATH} is served here\n"))),
        ])])
    manager = hcm.HttpConnectionManager(
        stat_prefix=METRICS_LISTENER, codec_type=hcm.HttpConnectionManager.AUTO, route_config=routes,
        # Decoded %2F and dot segments are resolved before matching: no path reaches the admin API
        # but the exact one.
        normalize_path=wrappers_pb2.BoolValue(value=True), merge_slashes=True,
        path_with_escaped_slashes_action=hcm.HttpConnectionManager.REJECT_REQUEST,
        http_filters=[listeners.router()],
    )
    listener = listener_pb2.Listener(
        name=METRICS_LISTENER,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=pb.pack_any(manager))])],
    )
    b.static_resources.clusters.append(admin)
    b.static_resources.listeners.append(listener)


def istio_bootstrap(
    node_id: str, xds_host: str, xds_port: int, admin_port: int, listen_port: int, delta: bool = False, tls: XdsClientTls | None = None
) -> str:
    """An Envoy as the Istio/ASM ingress gateway runs it: its listener is static (istiod's, in
    production) and only takes the route configuration `meshserve_rest` from our server, which
    then brings in our clusters and endpoints. The node's cluster selects the Istio group."""
    b = _bootstrap(node_id, xds_host, xds_port, admin_port, ISTIO_GROUP, delta, tls)
    b.dynamic_resources.ClearField("lds_config")
    listener = listeners.build_listener(r.REST, "127.0.0.1", listen_port, http2_only=False)
    listener.name = "istio_ingress_8008"
    b.static_resources.listeners.append(listener)
    return json_format.MessageToJson(b)


def _bootstrap(
    node_id: str, xds_host: str, xds_port: int, admin_port: int, group: str, delta: bool, tls: XdsClientTls | None = None
) -> bootstrap_pb2.Bootstrap:
    ads = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)
    api_type = config_source_pb2.ApiConfigSource.DELTA_GRPC if delta else config_source_pb2.ApiConfigSource.GRPC
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node_id, cluster=group),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=api_type,
                transport_api_version=config_source_pb2.V3,
                grpc_services=[grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER))],
                set_node_on_first_message_only=True,
            ),
            lds_config=ads,
            cds_config=ads,
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            clusters=[_xds_cluster(xds_host, xds_port, tls)]
        ),
        admin=bootstrap_pb2.Admin(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=admin_port))
        ),
        stats_config=_stats_config(),
    )


def _stats_config() -> stats_pb2.StatsConfig:
    """Envoy keeps 12 stats per RDS subscription. The scoped layout has one RouteConfiguration
    per loaded model, and at 10^5 models those stats are a large share of Envoy's memory
    (docs/design/routing.md). Per-model request stats come from the routes' stat_prefix when
    Settings.xds_route_stats turns them on; the listener-level RDS stats (meshserve_rest,
    meshserve_grpc) are kept."""
    return stats_pb2.StatsConfig(stats_matcher=stats_pb2.StatsMatcher(exclusion_list=string_pb2.ListStringMatcher(patterns=[
        string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=r"^http\.meshserve_(rest|grpc)\.rds\.model.*")),
    ])))


def _xds_cluster(host: str, port: int, tls: XdsClientTls | None = None) -> cluster_pb2.Cluster:
    c = clusters.build_cluster(XDS_CLUSTER, http2=True)
    c.type = cluster_pb2.Cluster.STRICT_DNS if not host.replace(".", "").isdigit() else cluster_pb2.Cluster.STATIC
    c.ClearField("eds_cluster_config")
    c.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    c.load_assignment.CopyFrom(clusters.build_load_assignment(XDS_CLUSTER, host, port))
    if tls is not None:
        c.transport_socket.CopyFrom(xds_transport_socket(tls))
    return c


def xds_transport_socket(tls: XdsClientTls) -> base_pb2.TransportSocket:
    """Envoy's side of xDS mTLS: present the client certificate, trust only the CA, send the
    server name as SNI and require it among the server certificate's DNS SANs, speak h2 (gRPC)."""
    ctx = tls_pb2.UpstreamTlsContext(
        sni=tls.server_name,
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_params=tls_common_pb2.TlsParameters(  # Envoy's upstream default is at most 1.2
                tls_minimum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_2,
                tls_maximum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_3),
            tls_certificates=[tls_common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(filename=tls.cert), private_key=base_pb2.DataSource(filename=tls.key))],
            validation_context=tls_common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=tls.ca),
                match_typed_subject_alt_names=[tls_common_pb2.SubjectAltNameMatcher(
                    san_type=tls_common_pb2.SubjectAltNameMatcher.DNS, matcher=string_pb2.StringMatcher(exact=tls.server_name))],
            ),
            alpn_protocols=["h2"],
        ),
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pb.pack_any(ctx))


def proxyless_bootstrap(node_id: str, xds_host: str, xds_port: int, tls: XdsClientTls | None = None) -> str:
    """The file grpcio's xDS client reads (named by GRPC_XDS_BOOTSTRAP) to dial xds:///meshserve.

    With `tls`, the client dials with gRPC's `tls` channel credentials (mTLS, gRFC A65). gRPC
    checks the server's certificate against the host of `server_uri` (here `xds_host`), not
    `tls.server_name`: the certificate must name that host (DNS or IP SAN)."""
    import json

    creds: dict[str, object] = {"type": "insecure"}
    if tls is not None:
        creds = {"type": "tls", "config": {"ca_certificate_file": tls.ca, "certificate_file": tls.cert, "private_key_file": tls.key}}
    return json.dumps({
        "xds_servers": [{"server_uri": f"{xds_host}:{xds_port}", "channel_creds": [creds], "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "cluster": PROXYLESS_GROUP, "locality": {"region": "meshserve"}},
    })


def write_gateway_bootstrap(out: str, node_id: str, s: "Settings") -> str:
    """The gateway bootstrap from the settings, written to `out`; returns it."""
    tls = XdsClientTls.from_settings(s)
    metrics = (s.envoy_metrics_host, s.envoy_metrics_port) if s.envoy_metrics_host else None
    text = gateway_bootstrap(node_id, s.host, s.xds_port, s.envoy_admin_port, tls=tls, metrics=metrics)
    with open(out, "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> None:
    import argparse

    from meshserve.settings import Settings

    ap = argparse.ArgumentParser(prog="meshserve_xds.bootstrap", description="Write the gateway Envoy's bootstrap from MESHSERVE_* settings.")
    ap.add_argument("out", help="the file to write, e.g. /bootstrap/envoy.json")
    ap.add_argument("node_id", help="the Envoy node id, e.g. the pod name")
    args = ap.parse_args(argv)
    try:
        write_gateway_bootstrap(args.out, args.node_id, Settings.from_env())
    except ValueError as e:  # a half-configured MESHSERVE_XDS_TLS_*
        raise SystemExit(f"meshserve_xds.bootstrap: {e}") from None


if __name__ == "__main__":
    main()
