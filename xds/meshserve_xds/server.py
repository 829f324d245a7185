"""The ADS server, state-of-the-world and incremental (delta), kept thin: it only speaks the protocol.

Per stream and per type it tracks what was sent (version, nonce) and what Envoy acknowledged.
A request whose nonce is not the latest one sent is stale and ignored. A request carrying
`error_detail` is a NACK: logged with Envoy's reason, counted, and the rejected version is
not sent again; the gateway keeps its last good config until the snapshot moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
from prometheus_client import Counter, Gauge, Histogram

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache

log = logging.getLogger("meshserve.xds")

# Types whose resources name clusters: a cluster is only removed once these are ACKed.
ROUTE_TYPES = {r.ROUTE_TYPE, r.SCOPED_ROUTE_TYPE, r.VHOST_TYPE}
KEEP_SUFFIX = "+keep"  # version of a cluster list that still carries clusters being removed

# Subscriptions to these types name their resources; the others are wildcard.
NAMED_TYPES = {r.ENDPOINT_TYPE, r.ROUTE_TYPE, r.VHOST_TYPE}

M_CONNECTED = Gauge("meshserve_xds_connected_gateways", "Gateways with an open ADS stream")
M_PUSHES = Counter("meshserve_xds_pushes", "Discovery responses sent", ["type"])
M_BYTES = Counter("meshserve_xds_pushed_bytes", "Bytes of resources sent", ["type"])
M_NACKS = Counter("meshserve_xds_nacks", "Responses a gateway rejected", ["type"])
M_IN_SYNC = Gauge("meshserve_xds_gateway_in_sync", "1 when the gateway ACKed the latest version sent of this type", ["node", "type"])
M_VERSION = Gauge("meshserve_xds_gateway_config_version", "The config version a gateway last ACKed, as a label (value 1)", ["node", "type", "version"])
M_ACK_LATENCY = Histogram(
    "meshserve_xds_ack_seconds", "From sending a response to the gateway's ACK",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def short_type(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


@dataclass
class TypeState:
    subscribed: bool = False
    names: set[str] = field(default_factory=set)
    sent_version: str = ""
    nonce: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    nacked_version: str = ""
    last_error: str = ""
    # delta only: a wildcard subscription, what the client holds (name -> version), and the
    # names subscribed but not answered yet (answered even when the snapshot did not move)
    wildcard: bool = False
    known: dict[str, str] = field(default_factory=dict)
    unanswered: set[str] = field(default_factory=set)
    answered_once: bool = False
    resumed: bool = False
    pending: bool = False  # a response awaits its ACK or NACK
    synced_seq: int | None = None  # the type's change-log position this stream has diffed up to
    # clusters only: what the stream holds (SotW) / removals held back (delta) until routes settle
    held: dict[str, object] = field(default_factory=dict)
    held_back: set[str] = field(default_factory=set)
    metric_version: str = ""  # the version label currently exported for this gateway and type


@dataclass
class StreamState:
    node_id: str = ""
    group: str = ""
    types: dict[str, TypeState] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    delta: bool = False


GATEWAY_GROUP = "meshserve-gateway"  # our own Envoy: listeners, routes, clusters, endpoints
ISTIO_GROUP = "meshserve-istio"  # a gateway whose listeners come from istiod: no listeners
PROXYLESS_GROUP = "meshserve-proxyless"  # grpcio's own xDS client: an api_listener, no gateway
GROUPS = (GATEWAY_GROUP, ISTIO_GROUP, PROXYLESS_GROUP)


def group_of(node_cluster: str, node_id: str) -> str:
    """Gateways that share config share a group, named by Envoy's node.cluster."""
    return node_cluster if node_cluster in GROUPS else GATEWAY_GROUP


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self.streams: dict[str, StreamState] = {}

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        ss = StreamState()
        async for resp in self._serve(ss, request_iterator, lambda req: self._on_request(ss, req), lambda: self._due(ss)):
            yield resp

    async def DeltaAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        ss = StreamState(delta=True)
        async for resp in self._serve(ss, request_iterator, lambda req: self._on_delta_request(ss, req), lambda: self._delta_due(ss)):
            yield resp

    async def _serve(self, ss: StreamState, requests: AsyncIterator, on_request, due) -> AsyncIterator:  # type: ignore[no-untyped-def]
        """One ADS stream: a reader applies requests to `ss`, a pusher sends what is `due` when
        the group's snapshot moves or a request asks for something new."""
        sid = uuid.uuid4().hex[:8]
        self.streams[sid] = ss
        M_CONNECTED.inc()
        out: asyncio.Queue[object | None] = asyncio.Queue()
        wake = asyncio.Event()

        async def reader() -> None:
            try:
                async for req in requests:
                    if on_request(req):
                        wake.set()
            finally:
                await out.put(None)

        async def pusher() -> None:
            while not ss.group:
                await wake.wait()
                wake.clear()
            g = self.cache.group(ss.group)
            while True:
                changed = g.changed
                for resp in due():
                    await out.put(resp)
                waiter = asyncio.ensure_future(changed.wait())
                wake_task = asyncio.ensure_future(wake.wait())
                await asyncio.wait({waiter, wake_task}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                wake_task.cancel()
                wake.clear()

        tasks = [asyncio.create_task(reader()), asyncio.create_task(pusher())]
        try:
            while True:
                resp = await out.get()
                if resp is None:
                    return
                yield resp
        finally:
            for t in tasks:
                t.cancel()
            self.streams.pop(sid, None)
            M_CONNECTED.dec()
            for t, ts in ss.types.items():
                try:
                    M_IN_SYNC.remove(ss.node_id, short_type(t))
                    if ts.metric_version:
                        M_VERSION.remove(ss.node_id, short_type(t), ts.metric_version)
                except KeyError:
                    pass
            log.info("gateway %s disconnected", ss.node_id)

    def _hello(self, ss: StreamState, node: object) -> None:
        if not ss.group:
            ss.node_id = node.id  # type: ignore[attr-defined]
            ss.group = group_of(node.cluster, node.id)  # type: ignore[attr-defined]
            self.cache.wanted.add(ss.group)
            log.info("gateway %s connected (group %s, %s)", ss.node_id, ss.group, "delta" if ss.delta else "sotw")

    def _nack(self, ss: StreamState, ts: "TypeState", type_url: str, message: str) -> None:
        if ts.nacked_version != ts.sent_version:
            M_NACKS.labels(short_type(type_url)).inc()
            # Envoy quotes the whole resource; the reason is at the end.
            log.error(
                "gateway %s rejected %s version %s: ...%s",
                ss.node_id, short_type(type_url), ts.sent_version, message[-600:],
            )
        ts.nacked_version = ts.sent_version
        ts.last_error = message

    def _on_delta_request(self, ss: StreamState, req: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        """Apply one delta request; True when something may now be due."""
        self._hello(ss, req.node)
        ts = ss.types.setdefault(req.type_url, TypeState())
        answered = False
        if req.response_nonce:
            if req.response_nonce != ts.nonce:
                return False  # stale
            ts.pending = False
            answered = True
            if req.HasField("error_detail"):
                # The rejected versions stay recorded as sent, so they are not sent again;
                # the next change to those resources gives them a new version.
                self._nack(ss, ts, req.type_url, req.error_detail.message)
            else:
                if ts.acked_version != ts.sent_version:
                    M_ACK_LATENCY.observe(time.monotonic() - ts.sent_at)
                ts.acked_version = ts.sent_version
            self._record(ss, req.type_url, ts, ts.acked_version)
        first = not ts.subscribed
        ts.subscribed = True
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if first:
            # An empty first subscription is a wildcard one (LDS, CDS); "*" says so explicitly.
            ts.wildcard = not subscribe or "*" in subscribe
            ts.known = dict(req.initial_resource_versions)
            ts.resumed = bool(ts.known)
        if "*" in subscribe:
            ts.wildcard = True
        if "*" in unsubscribe:
            ts.wildcard = False
        subscribe.discard("*")
        unsubscribe.discard("*")
        ts.names |= subscribe
        ts.names -= unsubscribe
        ts.unanswered -= unsubscribe
        for n in unsubscribe:
            ts.known.pop(n, None)
        if not first:
            # A fresh subscription to a name is a request for it, whatever was sent before.
            for n in subscribe:
                ts.known.pop(n, None)
            ts.unanswered |= subscribe
        return first or bool(subscribe) or answered

    def _delta_due(self, ss: StreamState) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        g = self.cache.group(ss.group)
        out = []
        for type_url in r.PUSH_ORDER:
            ts = ss.types.get(type_url)
            snap = g.types.get(type_url)
            if ts is None or not ts.subscribed:
                continue
            first_answer = not ts.answered_once
            if not first_answer and (snap is None or snap.version == ts.sent_version) and not ts.unanswered:
                continue
            if type_url in ROUTE_TYPES and not self._clusters_settled(ss):
                continue  # routes may name new clusters: wait until those are warm
            diff = self.cache.delta(ss.group, type_url, ts.known, ts.wildcard, ts.names, ts.synced_seq, ts.unanswered | ts.held_back)
            ts.synced_seq = diff.seq
            ts.unanswered = set()
            ts.answered_once = True
            if snap is not None:
                ts.sent_version = snap.version
            if type_url == r.CLUSTER_TYPE and diff.removed and not self._routes_settled(ss):
                # Removed clusters go last (see _due); they are looked at again on the route ACK.
                ts.held_back = set(diff.removed)
                diff.removed = []
                if snap is not None:
                    ts.sent_version = snap.version + KEEP_SUFFIX
            elif type_url == r.CLUSTER_TYPE:
                ts.held_back = set()
            # A fresh Envoy waits for a first answer before it finishes initializing, even an
            # empty one; a resumed one (it told us what it holds) needs nothing if nothing changed.
            if not diff.updated and not diff.removed and not (first_answer and not ts.resumed):
                if not ts.pending:
                    ts.acked_version = ts.sent_version  # it already holds all of this version
                continue
            for n, v, _ in diff.updated:
                ts.known[n] = v
            for n in diff.removed:
                ts.known.pop(n, None)
            ts.nonce = uuid.uuid4().hex[:12]
            ts.sent_at = time.monotonic()
            ts.pending = True
            resp = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=ts.sent_version,
                type_url=type_url,
                nonce=ts.nonce,
                resources=[discovery_pb2.Resource(name=n, version=v, resource=a) for n, v, a in diff.updated],
                removed_resources=diff.removed,
            )
            M_PUSHES.labels(short_type(type_url)).inc()
            M_BYTES.labels(short_type(type_url)).inc(sum(len(a.value) for _, _, a in diff.updated))
            out.append(resp)
        return out

    def _on_request(self, ss: StreamState, req: discovery_pb2.DiscoveryRequest) -> bool:
        """Apply one request to the stream state; True when something may now be due."""
        self._hello(ss, req.node)
        ts = ss.types.setdefault(req.type_url, TypeState())
        if req.response_nonce and req.response_nonce != ts.nonce:
            return False  # stale: answers a response that a newer one replaced
        answered = bool(req.response_nonce)
        if answered:
            ts.pending = False
        if req.HasField("error_detail"):
            self._nack(ss, ts, req.type_url, req.error_detail.message)
        elif req.response_nonce:
            if ts.acked_version != req.version_info:
                M_ACK_LATENCY.observe(time.monotonic() - ts.sent_at)
            ts.acked_version = req.version_info
        if answered:
            self._record(ss, req.type_url, ts, ts.acked_version)
        names = set(req.resource_names)
        new_names = req.type_url in NAMED_TYPES and names != ts.names
        first = not ts.subscribed
        ts.subscribed = True
        ts.names = names
        if new_names:
            ts.sent_version = ""  # the set of wanted resources changed: answer it
        # An answer may release what waits on it: routes wait for clusters and endpoints,
        # removed clusters wait for routes.
        return first or new_names or answered

    def _due(self, ss: StreamState) -> list[discovery_pb2.DiscoveryResponse]:
        g = self.cache.group(ss.group)
        out = []
        for type_url in r.PUSH_ORDER:
            ts = ss.types.get(type_url)
            snap = g.types.get(type_url)
            if ts is None or not ts.subscribed or snap is None:
                continue
            if snap.version == ts.sent_version or snap.version == ts.nacked_version:
                continue
            if type_url in ROUTE_TYPES and not self._clusters_settled(ss):
                continue  # routes may name new clusters: wait until those are warm
            version = snap.version
            if type_url in NAMED_TYPES:
                items = [snap.resources[n] for n in sorted(ts.names) if n in snap.resources]
            elif type_url == r.CLUSTER_TYPE:
                # Removed clusters go last: keep sending them until the gateway has ACKed
                # routes that no longer name them, or requests in between get a 503.
                sent = dict(snap.resources)
                gone = {n: a for n, a in ts.held.items() if n not in sent}
                if gone and not self._routes_settled(ss):
                    version = snap.version + KEEP_SUFFIX
                    if version == ts.sent_version:
                        continue
                    sent.update(gone)
                ts.held = sent
                items = list(sent.values())
            else:
                items = list(snap.resources.values())
            ts.nonce = uuid.uuid4().hex[:12]
            ts.sent_version = version
            ts.sent_at = time.monotonic()
            ts.pending = True
            resp = discovery_pb2.DiscoveryResponse(version_info=version, resources=items, type_url=type_url, nonce=ts.nonce)
            M_PUSHES.labels(short_type(type_url)).inc()
            M_BYTES.labels(short_type(type_url)).inc(sum(len(a.value) for a in items))
            out.append(resp)
        return out

    @staticmethod
    def _clusters_settled(ss: StreamState) -> bool:
        """No cluster or endpoint response is in flight to this gateway: the clusters a route
        may name are warm (Envoy answers EDS once it applied it), or were rejected."""
        for t in (r.CLUSTER_TYPE, r.ENDPOINT_TYPE):
            ts = ss.types.get(t)
            if ts is not None and ts.subscribed and ts.pending:
                return False
        return True

    @staticmethod
    def _record(ss: StreamState, type_url: str, ts: "TypeState", acked: str) -> None:
        """Per-gateway config state as metrics: in sync or not, and the version it holds."""
        t = short_type(type_url)
        if acked and acked != ts.metric_version:
            if ts.metric_version:
                M_VERSION.remove(ss.node_id, t, ts.metric_version)
            M_VERSION.labels(ss.node_id, t, acked).set(1)
            ts.metric_version = acked
        M_IN_SYNC.labels(ss.node_id, t).set(1 if ts.acked_version == ts.sent_version else 0)

    def _routes_settled(self, ss: StreamState) -> bool:
        """Has this gateway ACKed the current version of every route type it subscribes to?"""
        g = self.cache.group(ss.group)
        for t in ROUTE_TYPES:
            ts, snap = ss.types.get(t), g.types.get(t)
            if ts is not None and ts.subscribed and snap is not None and ts.acked_version != snap.version:
                return False
        return True

    def debug(self) -> list[dict[str, object]]:
        return [
            {
                "stream": sid,
                "node": ss.node_id,
                "group": ss.group,
                "protocol": "delta" if ss.delta else "sotw",
                "types": {
                    short_type(t): {
                        "sent": ts.sent_version,
                        "acked": ts.acked_version,
                        "nacked": ts.nacked_version,
                        "in_sync": ts.sent_version == ts.acked_version,
                        "last_error": ts.last_error,
                        "names": len(ts.names),
                    }
                    for t, ts in ss.types.items()
                },
            }
            for sid, ss in self.streams.items()
        ]
