"""State-of-the-world ADS streams: each response carries every resource of its type (of the
names asked for, for named types), versioned by the snapshot's type version."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from meshserve_xds import fastpb
from meshserve_xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, PUSH_ORDER, ROUTE_TYPE, VHOST_TYPE
from meshserve_xds.stream import KEEP_SUFFIX, ROUTE_TYPES, Stream, TypeStatus, WireResponse, count_push

# Subscriptions to these types name their resources; the others are wildcard.
NAMED_TYPES = {ENDPOINT_TYPE, ROUTE_TYPE, VHOST_TYPE}


@dataclass
class SotwType(TypeStatus):
    # clusters only: what the stream holds, removed clusters included until routes settle
    held: dict[str, bytes] = field(default_factory=dict)


class SotwStream(Stream[SotwType]):
    protocol = "sotw"

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> bool:
        """Apply one request to the stream state; True when something may now be due."""
        self.hello(req.node)
        ts = self.types.setdefault(req.type_url, SotwType())
        if req.response_nonce and req.response_nonce != ts.nonce:
            return False  # stale: answers a response that a newer one replaced
        answered = bool(req.response_nonce)
        if answered:
            ts.pending = False
        if req.HasField("error_detail"):
            self.nack(ts, req.type_url, req.error_detail.message)
        elif answered:
            ts.observe_ack(req.version_info)
        if answered:
            self.record(req.type_url, ts)
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

    def due(self) -> list[WireResponse]:
        g = self.cache.group(self.group)
        out = []
        for type_url in PUSH_ORDER:
            ts = self.types.get(type_url)
            snap = g.types.get(type_url)
            if ts is None or not ts.subscribed or snap is None:
                continue
            if snap.version == ts.sent_version or snap.version == ts.nacked_version:
                continue
            if type_url in ROUTE_TYPES and not self.clusters_settled():
                continue  # routes may name new clusters: wait until those are warm
            version = snap.version
            if type_url in NAMED_TYPES:
                items = [snap.resources[n] for n in sorted(ts.names) if n in snap.resources]
            elif type_url == CLUSTER_TYPE:
                # Removed clusters go last: keep sending them until the gateway has ACKed
                # routes that no longer name them, or requests in between get a 503.
                sent = dict(snap.resources)
                gone = {n: a for n, a in ts.held.items() if n not in sent}
                if gone and not self.routes_settled():
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
            # Written from the cache's bytes, sent as they are (fastpb.discovery_response).
            wire = fastpb.discovery_response(version, type_url, ts.nonce, items)
            out.append(WireResponse(discovery_pb2.DiscoveryResponse, wire))
            count_push(type_url, sum(len(v) for v in items))
        return out
