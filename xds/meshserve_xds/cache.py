"""Versioned snapshots per node group, as go-control-plane's cache keeps them.

A snapshot holds each resource serialized (bytes, no message object), so a change is serialized
once per group however many gateways are connected, and a response is written by joining bytes
(fastpb.discovery_response, fastpb.delta_response). Per-type versions only move when that type's
content changed, so an unrelated change never re-sends (or re-warms) anything.

Versions are derived from content, never from a counter: two xDS replicas reading the same
Redis give the same resources the same versions, so a gateway that fails over from one replica
to another sees nothing new and re-applies nothing.

A resource comes as a message, or already serialized (bytes, or a `fastpb.WireTable` of them:
the scoped layout's full build); either way the digest is of the serialized message, so the
same resource has the same version whichever way it came.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from google.protobuf import any_pb2

from meshserve_xds.fastpb import WireTable
from meshserve_xds.resources import PUSH_ORDER, Patch, Resources


LOG_KEEP = 1024  # change-log entries kept per type; a stream further behind diffs in full


@dataclass
class TypeSnapshot:
    version: str
    # name -> the resource serialized (what an Any of this type carries as its value). Bytes,
    # not Anys: at 2,000,000 scopes an Any each cost ~3x the memory and most of a full build
    # (docs/design/routing.md, "Full build"); responses are written from these bytes
    # (fastpb.discovery_response, fastpb.delta_response).
    resources: dict[str, bytes]
    # name -> content digest; the digest's hex is the resource's version in delta xDS
    digests: dict[str, bytes]
    # XOR of the resources' digests: the type's version, updated in O(change) by a patch
    acc: int = 0
    seq: int = 0
    # (seq, names changed or removed at that seq): lets a delta stream diff only what moved
    log: list[tuple[int, list[str]]] = field(default_factory=list)

    def resource_version(self, name: str) -> str:
        return self.digests[name].hex()

    def names_since(self, seq: int) -> set[str] | None:
        """Names touched after `seq`, or None when the log no longer reaches back that far."""
        if seq == self.seq:
            return set()
        if not self.log or self.log[0][0] > seq + 1:
            return None
        out: set[str] = set()
        for s, names in reversed(self.log):
            if s <= seq:
                break
            out.update(names)
        return out


@dataclass
class Group:
    types: dict[str, TypeSnapshot] = field(default_factory=dict)
    generation: int = 0
    # Replaced on every change: a waiter takes the current event, then waits on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def serialize(msg: object) -> bytes:
    """A resource as the cache keeps it: a message serialized as `Any.Pack` does, an Any's
    value, or bytes (already serialized: fastpb) as they are."""
    if msg.__class__ is bytes:
        return msg  # type: ignore[return-value]
    if isinstance(msg, any_pb2.Any):
        return msg.value
    return msg.SerializeToString()  # type: ignore[attr-defined]


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


def pack(msg: object, type_url: str = "") -> tuple[bytes, bytes]:
    """A resource serialized (`serialize`), and its digest."""
    b = serialize(msg)
    return b, digest(b)


def _entries(items: Mapping[str, object]) -> Iterable[tuple[str, object]]:
    """name -> resource pairs of one type. A WireTable hands over what it holds (mostly bytes),
    so serialized resources are taken without being parsed."""
    return items.wire.items() if isinstance(items, WireTable) else items.items()


def _h(digest: bytes) -> int:
    """A resource's share of its type's version. The digest alone, not the name with it (one
    hash a resource, not two: a second was a third of a full build's packing): every xDS
    resource carries its own name (Cluster.name, RouteConfiguration.name, ...), so two names
    never hold the same bytes and cannot cancel out."""
    return int.from_bytes(digest, "big")


def _version(acc: int) -> str:
    return f"{acc & 0xFFFFFFFFFFFFFFFF:016x}"


def type_version(digests: dict[str, bytes]) -> str:
    acc = 0
    for d in digests.values():
        acc ^= _h(d)
    return _version(acc)


class SnapshotCache:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        # Groups some client has asked for: optional ones are only built once wanted.
        self.wanted: set[str] = set()

    def group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group()
        return g

    def set(self, name: str, res: Resources) -> list[str]:
        """Install new resources for a group; returns the type URLs whose version moved."""
        return self._set(name, res, {})

    def set_many(self, by_group: dict[str, Resources]) -> dict[str, list[str]]:
        """Install several groups at once. A message object shared between groups (the same
        clusters and routes, with or without listeners) is serialized once, not per group."""
        memo: dict[int, tuple[bytes, bytes]] = {}
        return {name: self._set(name, res, memo) for name, res in by_group.items()}

    def _set(self, name: str, res: Resources, memo: dict[int, tuple[bytes, bytes]]) -> list[str]:
        g = self.group(name)
        moved = []
        blake2b, from_bytes = hashlib.blake2b, int.from_bytes
        for type_url, items in res.by_type.items():
            # A WireTable is mostly bytes already: its dict copied whole (in C), then the few
            # messages in it replaced by their bytes.
            wire = isinstance(items, WireTable)
            packed: dict[str, bytes] = dict(items.wire) if wire else {}
            digests: dict[str, bytes] = {}
            acc = 0
            for rname, msg in _entries(items):
                if msg.__class__ is bytes:  # serialized already: digest() inlined, 10^6 times
                    d = blake2b(msg, digest_size=16).digest()  # type: ignore[arg-type]
                    if not wire:
                        packed[rname] = msg  # type: ignore[assignment]
                else:
                    hit = memo.get(id(msg))
                    if hit is None:
                        hit = memo[id(msg)] = pack(msg, type_url)
                    packed[rname], d = hit
                digests[rname] = d
                acc ^= from_bytes(d, "big")  # _h() inlined
            old = g.types.get(type_url)
            if old is not None and old.digests == digests:
                continue
            if old is None:
                g.types[type_url] = TypeSnapshot(_version(acc), packed, digests, acc, 1, [])
            else:
                touched = [n for n, d in digests.items() if old.digests.get(n) != d] + [n for n in old.digests if n not in digests]
                snap = TypeSnapshot(_version(acc), packed, digests, acc, old.seq + 1, old.log[-LOG_KEEP:])
                snap.log.append((snap.seq, touched))
                g.types[type_url] = snap
            moved.append(type_url)
        if moved:
            self._moved(g)
        return moved

    def patch(self, name: str, type_url: str, upserts: Mapping[str, object], removes: Iterable[str] = ()) -> bool:
        """Change some resources of one type and keep the rest: the cost follows the change,
        not the table. Returns whether the type's version moved."""
        g = self.group(name)
        snap = g.types.get(type_url)
        if snap is None:
            snap = g.types[type_url] = TypeSnapshot(_version(0), {}, {}, 0, 0, [])
        touched = []
        for rname, msg in _entries(upserts):
            b, d = pack(msg, type_url)
            old = snap.digests.get(rname)
            if old == d:
                continue
            if old is not None:
                snap.acc ^= _h(old)
            snap.acc ^= _h(d)
            snap.resources[rname], snap.digests[rname] = b, d
            touched.append(rname)
        for rname in removes:
            old = snap.digests.pop(rname, None)
            if old is None:
                continue
            snap.resources.pop(rname, None)
            snap.acc ^= _h(old)
            touched.append(rname)
        if not touched:
            return False
        snap.seq += 1
        snap.version = _version(snap.acc)
        snap.log.append((snap.seq, touched))
        if len(snap.log) > LOG_KEEP:
            del snap.log[: len(snap.log) - LOG_KEEP]
        self._moved(g)
        return True

    def apply(self, name: str, patch: Patch) -> list[str]:
        """A layout's patch, type by type in push order; returns the type URLs that moved. A
        type in `patch.replaces` loses whatever the group holds of it that the table lacks."""
        moved = []
        g = self.group(name)
        types = patch.replaces.keys() | patch.upserts.keys() | patch.removes.keys()
        for t in sorted(types, key=lambda t: PUSH_ORDER.index(t) if t in PUSH_ORDER else len(PUSH_ORDER)):
            hit = False
            if t in patch.replaces:
                table = patch.replaces[t]
                held = g.types.get(t)
                hit = self.patch(name, t, table, [n for n in (held.resources if held else {}) if n not in table])
            if patch.upserts.get(t) or patch.removes.get(t):
                hit = self.patch(name, t, patch.upserts.get(t, {}), patch.removes.get(t, ())) or hit
            if hit:
                moved.append(t)
        return moved

    def apply_many(self, updates: dict[str, Resources | Patch]) -> dict[str, list[str]]:
        """Several groups' updates: the whole ones installed together (`set_many`, so what
        they share is serialized once), then the patches."""
        whole = {g: u for g, u in updates.items() if isinstance(u, Resources)}
        moved = self.set_many(whole) if whole else {}
        for g, u in updates.items():
            if isinstance(u, Patch):
                moved[g] = self.apply(g, u)
        return moved

    @staticmethod
    def _moved(g: Group) -> None:
        g.generation += 1
        old_ev, g.changed = g.changed, asyncio.Event()
        old_ev.set()
