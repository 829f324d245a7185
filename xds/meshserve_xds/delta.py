"""Incremental (delta) ADS streams: each response carries only the resources the gateway lacks
or holds an old version of, and the names that are gone. A resource's version is its content
digest; the snapshot's change log lets a stream look only at what moved since its last diff."""

from __future__ import annotations

import time
import uuid
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Iterable

from envoy.service.discovery.v3 import discovery_pb2
from meshserve_xds import fastpb
from meshserve_xds.cache import TypeSnapshot
from meshserve_xds.resources import CLUSTER_TYPE, PUSH_ORDER, ROUTE_TYPE
from meshserve_xds.stream import KEEP_SUFFIX, ROUTE_TYPES, Stream, TypeStatus, WireResponse, count_push

# At most this many RouteConfigurations per response; the rest follow, a batch per ACK. A
# gateway that takes 10^5 of them in one message parses it whole while it builds the routes,
# and the parse's garbage, interleaved with what stays, is kept by the allocator: batches keep
# the gateway's memory nearer what its config needs (docs/design/routing.md, "Memory"). Only
# RDS: Envoy's listener waits for every RouteConfiguration its scopes name, so a gateway is
# not ready before the last batch, whereas scopes count as received with the first one.
MAX_RESOURCES = 5_000
BATCHED = {ROUTE_TYPE}
PARTIAL_SUFFIX = "+partial"  # version of a response that left resources for the next one
_NAME, _DIGEST, _VALUE = itemgetter(0), itemgetter(1), itemgetter(2)  # of DeltaDiff.updated's entries


@dataclass
class DeltaDiff:
    """What one delta stream must send for one type to catch up with the snapshot."""

    updated: list[tuple[str, bytes, bytes]]  # name, digest (its hex is the version), resource serialized
    removed: list[str]
    seq: int = 0  # the snapshot's seq this diff brings the stream up to


def diff(
    snap: TypeSnapshot | None, known: dict[str, bytes | str], wildcard: bool, subscribed: set[str],
    since_seq: int | None = None, also: Iterable[str] = (),
) -> DeltaDiff:
    """Resources a delta client lacks or holds an old version of, and names it holds that
    are gone. `known` is name -> what the client has (or was last sent): the digest we sent,
    or the version it told us (`known_versions`). With
    `since_seq` (the seq of the stream's last diff) only names touched since then, plus
    `also` (new subscriptions), are looked at, so a change costs what it touched."""
    if snap is None:
        return DeltaDiff([], [], 0)
    if wildcard and not known and since_seq is None:
        # A fresh wildcard subscriber (a gateway's first scopes: 2,000,001 at a million
        # models): everything, with no per-name comparisons.
        res = snap.resources
        return DeltaDiff(sorted([(n, d, res[n]) for n, d in snap.digests.items()]), [], snap.seq)
    candidates = snap.names_since(since_seq) if since_seq is not None else None
    if candidates is None:
        candidates = set(snap.digests) if wildcard else set(subscribed)
        candidates.update(known)
    else:
        candidates.update(also)
    updated = []
    removed = []
    for n in candidates:
        if not (wildcard or n in subscribed):
            continue
        d = snap.digests.get(n)
        if d is None:
            if n in known:
                removed.append(n)
            continue
        if known.get(n) != d:
            updated.append((n, d, snap.resources[n]))
    updated.sort()  # by name: names are unique, so the tuples never compare further
    return DeltaDiff(updated, sorted(removed), snap.seq)


def known_versions(versions: dict[str, str] | object) -> dict[str, bytes | str]:
    """A resuming client's name -> version, as digests: ours are a digest's hex. A version that
    is not one (another control plane's) stays a string, which never equals a digest."""
    out: dict[str, bytes | str] = {}
    for n, v in versions.items():  # type: ignore[attr-defined]
        try:
            out[n] = bytes.fromhex(v)
        except ValueError:
            out[n] = v
    return out


@dataclass
class DeltaType(TypeStatus):
    wildcard: bool = False
    # What the client holds: name -> digest (the cache's own object, shared: no hex string per
    # resource per gateway, 2,000,000 of them at a million models).
    known: dict[str, bytes | str] = field(default_factory=dict)
    unanswered: set[str] = field(default_factory=set)  # subscribed, answered even if nothing moved
    answered_once: bool = False
    resumed: bool = False  # the client said what it holds on its first request
    synced_seq: int | None = None  # the type's change-log position this stream has diffed up to
    held_back: set[str] = field(default_factory=set)  # clusters only: removals waiting for routes
    backlog: list[str] = field(default_factory=list)  # due but left for the next batches (MAX_RESOURCES)


class DeltaStream(Stream[DeltaType]):
    protocol = "delta"

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> bool:
        """Apply one delta request; True when something may now be due."""
        self.hello(req.node)
        ts = self.types.setdefault(req.type_url, DeltaType())
        answered = False
        if req.response_nonce:
            if req.response_nonce != ts.nonce:
                return False  # stale
            ts.pending = False
            answered = True
            if req.HasField("error_detail"):
                # The rejected versions stay recorded as sent, so they are not sent again;
                # the next change to those resources gives them a new version.
                self.nack(ts, req.type_url, req.error_detail.message)
            else:
                ts.observe_ack(ts.sent_version)
            self.record(req.type_url, ts)
        first = not ts.subscribed
        ts.subscribed = True
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if first:
            # An empty first subscription is a wildcard one (LDS, CDS); "*" says so explicitly.
            ts.wildcard = not subscribe or "*" in subscribe
            ts.known = known_versions(req.initial_resource_versions)
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

    def due(self) -> list[WireResponse]:
        g = self.cache.group(self.group)
        out = []
        for type_url in PUSH_ORDER:
            ts = self.types.get(type_url)
            snap = g.types.get(type_url)
            if ts is None or not ts.subscribed:
                continue
            first_answer = not ts.answered_once
            if not first_answer and (snap is None or snap.version == ts.sent_version) and not ts.unanswered and not ts.backlog:
                continue
            if ts.backlog and ts.pending:
                continue  # the next batch goes once the gateway has taken this one
            if type_url in ROUTE_TYPES and not self.clusters_settled():
                continue  # routes may name new clusters: wait until those are warm
            # Only the next batch of the backlog is looked at: a batch costs its own size.
            later = ts.backlog[MAX_RESOURCES:]
            d = diff(snap, ts.known, ts.wildcard, ts.names, ts.synced_seq, ts.unanswered | ts.held_back | set(ts.backlog[:MAX_RESOURCES]))
            ts.synced_seq = d.seq
            ts.unanswered = set()
            ts.answered_once = True
            if type_url in BATCHED:
                ts.backlog = list(dict.fromkeys([n for n, _, _ in d.updated[MAX_RESOURCES:]] + later))
                del d.updated[MAX_RESOURCES:]
            if snap is not None:
                # Until the last batch the gateway does not hold this version: not "in sync",
                # and removed clusters keep waiting for the routes.
                ts.sent_version = snap.version + (PARTIAL_SUFFIX if ts.backlog else "")
            if type_url == CLUSTER_TYPE and d.removed and not self.routes_settled():
                # Removed clusters go last (see sotw.py); looked at again on the route ACK.
                ts.held_back = set(d.removed)
                d.removed = []
                if snap is not None:
                    ts.sent_version = snap.version + KEEP_SUFFIX
            elif type_url == CLUSTER_TYPE:
                ts.held_back = set()
            # A fresh Envoy waits for a first answer before it finishes initializing, even an
            # empty one; a resumed one (it told us what it holds) needs nothing if nothing changed.
            if not d.updated and not d.removed and not (first_answer and not ts.resumed):
                if not ts.pending:
                    ts.acked_version = ts.sent_version  # it already holds all of this version
                continue
            ts.known.update(zip(map(_NAME, d.updated), map(_DIGEST, d.updated)))
            for n in d.removed:
                ts.known.pop(n, None)
            ts.nonce = uuid.uuid4().hex[:12]
            ts.sent_at = time.monotonic()
            ts.pending = True
            # Written from the cache's bytes rather than built a Resource and an Any at a
            # time: the same message (fastpb.delta_response), sent as these bytes.
            wire = fastpb.delta_response(ts.sent_version, type_url, ts.nonce, [(n, dg.hex(), v) for n, dg, v in d.updated], d.removed)
            out.append(WireResponse(discovery_pb2.DeltaDiscoveryResponse, wire))
            count_push(type_url, sum(map(len, map(_VALUE, d.updated))))
        return out
