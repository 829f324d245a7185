"""What an ADS stream keeps per resource type, and the rules both protocols share: ACK and
NACK bookkeeping, per-gateway metrics, and the ordering that keeps a gateway from routing to
a cluster it does not have (routes wait for clusters; removed clusters wait for routes).

sotw.py and delta.py each add their own per-type state and speak their protocol; server.py
runs the streams (go-control-plane's split: the cache apart from the server, SotW apart from
delta).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from meshserve_xds.cache import SnapshotCache
from meshserve_xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, GATEWAY_GROUP, GROUPS, ROUTE_TYPE, SCOPED_ROUTE_TYPE, VHOST_TYPE

log = logging.getLogger("meshserve.xds")

# Types whose resources name clusters: a cluster is only removed once these are ACKed.
ROUTE_TYPES = {ROUTE_TYPE, SCOPED_ROUTE_TYPE, VHOST_TYPE}
KEEP_SUFFIX = "+keep"  # version of a cluster list that still carries clusters being removed

M_PUSHES = Counter("meshserve_xds_pushes", "Discovery responses sent", ["type"])
M_BYTES = Counter("meshserve_xds_pushed_bytes", "Bytes of resources sent", ["type"])
M_NACKS = Counter("meshserve_xds_nacks", "Responses a gateway rejected", ["type"])
M_IN_SYNC = Gauge("meshserve_xds_gateway_in_sync", "1 when the gateway ACKed the latest version sent of this type", ["node", "type"])
M_VERSION = Gauge("meshserve_xds_gateway_config_version", "The config version a gateway last ACKed, as a label (value 1)", ["node", "type", "version"])
M_ACK_LATENCY = Histogram(
    "meshserve_xds_ack_seconds", "From sending a response to the gateway's ACK",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class WireResponse:
    """A discovery response already serialized (fastpb.delta_response, discovery_response).
    The server sends these bytes as they are (`AdsServer.add_to` registers a serializer that
    asks the response for its bytes); reading a field parses it, once. At a million models the
    first scoped-route response is ~2,000,000 resources: no message is built for it at all."""

    __slots__ = ("wire", "cls", "_msg")

    def __init__(self, cls: type, wire: bytes):
        self.wire, self.cls, self._msg = wire, cls, None

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name, which the serializer calls)
        return self.wire

    def message(self) -> object:
        if self._msg is None:
            self._msg = self.cls.FromString(self.wire)
        return self._msg

    def __getattr__(self, name: str) -> object:
        return getattr(self.message(), name)


def short_type(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def group_of(node_cluster: str, node_id: str) -> str:
    """Gateways that share config share a group, named by Envoy's node.cluster."""
    return node_cluster if node_cluster in GROUPS else GATEWAY_GROUP


def count_push(type_url: str, nbytes: int) -> None:
    M_PUSHES.labels(short_type(type_url)).inc()
    M_BYTES.labels(short_type(type_url)).inc(nbytes)


@dataclass
class TypeStatus:
    """Per stream and type, in either protocol: what was sent and what the gateway answered."""

    subscribed: bool = False
    names: set[str] = field(default_factory=set)
    sent_version: str = ""
    nonce: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    nacked_version: str = ""
    last_error: str = ""
    pending: bool = False  # a response awaits its ACK or NACK
    metric_version: str = ""  # the version label currently exported for this gateway and type

    def observe_ack(self, version: str) -> None:
        if self.acked_version != version:
            M_ACK_LATENCY.observe(time.monotonic() - self.sent_at)
        self.acked_version = version


T = TypeVar("T", bound=TypeStatus)


class Stream(Generic[T]):
    """One gateway's ADS stream. Subclasses: `on_request(req) -> bool` (True when something
    may now be due) and `due() -> responses`."""

    protocol = ""

    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self.node_id = ""
        self.group = ""
        self.types: dict[str, T] = {}
        self.connected_at = time.time()

    def hello(self, node: object) -> None:
        if not self.group:
            self.node_id = node.id  # type: ignore[attr-defined]
            self.group = group_of(node.cluster, node.id)  # type: ignore[attr-defined]
            self.cache.wanted.add(self.group)
            log.info("gateway %s connected (group %s, %s)", self.node_id, self.group, self.protocol)

    def nack(self, ts: T, type_url: str, message: str) -> None:
        if ts.nacked_version != ts.sent_version:
            M_NACKS.labels(short_type(type_url)).inc()
            # Envoy quotes the whole resource; the reason is at the end.
            log.error("gateway %s rejected %s version %s: ...%s", self.node_id, short_type(type_url), ts.sent_version, message[-600:])
        ts.nacked_version = ts.sent_version
        ts.last_error = message

    def record(self, type_url: str, ts: T) -> None:
        """Per-gateway config state as metrics: in sync or not, and the version it holds."""
        t, acked = short_type(type_url), ts.acked_version
        if acked and acked != ts.metric_version:
            if ts.metric_version:
                M_VERSION.remove(self.node_id, t, ts.metric_version)
            M_VERSION.labels(self.node_id, t, acked).set(1)
            ts.metric_version = acked
        M_IN_SYNC.labels(self.node_id, t).set(1 if ts.acked_version == ts.sent_version else 0)

    def forget_metrics(self) -> None:
        for t, ts in self.types.items():
            try:
                M_IN_SYNC.remove(self.node_id, short_type(t))
                if ts.metric_version:
                    M_VERSION.remove(self.node_id, short_type(t), ts.metric_version)
            except KeyError:
                pass

    def clusters_settled(self) -> bool:
        """No cluster or endpoint response is in flight to this gateway: the clusters a route
        may name are warm (Envoy answers EDS once it applied it), or were rejected."""
        for t in (CLUSTER_TYPE, ENDPOINT_TYPE):
            ts = self.types.get(t)
            if ts is not None and ts.subscribed and ts.pending:
                return False
        return True

    def routes_settled(self) -> bool:
        """Has this gateway ACKed the current version of every route type it subscribes to?"""
        g = self.cache.group(self.group)
        for t in ROUTE_TYPES:
            ts, snap = self.types.get(t), g.types.get(t)
            if ts is not None and ts.subscribed and snap is not None and ts.acked_version != snap.version:
                return False
        return True

    def debug(self) -> dict[str, object]:
        return {
            "node": self.node_id,
            "group": self.group,
            "protocol": self.protocol,
            "types": {
                short_type(t): {
                    "sent": ts.sent_version, "acked": ts.acked_version, "nacked": ts.nacked_version,
                    "in_sync": ts.sent_version == ts.acked_version, "last_error": ts.last_error, "names": len(ts.names),
                }
                for t, ts in self.types.items()
            },
        }
