"""Versioned snapshots per node group, as go-control-plane's cache keeps them.

A snapshot holds each resource already packed into an Any, so a change is serialized once per
group however many gateways are connected. Per-type versions only move when that type's
content changed, so an unrelated change never re-sends (or re-warms) anything.

Versions are derived from content, never from a counter: two xDS replicas reading the same
Redis give the same resources the same versions, so a gateway that fails over from one replica
to another sees nothing new and re-applies nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Iterable

from google.protobuf import any_pb2

from meshserve_xds.resources import Resources


@dataclass
class TypeSnapshot:
    version: str
    resources: dict[str, any_pb2.Any]
    # name -> content digest; the digest's hex is the resource's version in delta xDS
    digests: dict[str, bytes]

    def resource_version(self, name: str) -> str:
        return self.digests[name].hex()


@dataclass
class Group:
    types: dict[str, TypeSnapshot] = field(default_factory=dict)
    generation: int = 0
    # Replaced on every change: a waiter takes the current event, then waits on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class DeltaDiff:
    """What one delta stream must send for one type to catch up with the snapshot."""

    updated: list[tuple[str, str, any_pb2.Any]]  # name, version, resource
    removed: list[str]


def pack(msg: object) -> tuple[any_pb2.Any, bytes]:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a, hashlib.blake2b(a.value, digest_size=16).digest()


def type_version(digests: dict[str, bytes]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(digests):
        h.update(name.encode())
        h.update(digests[name])
    return h.hexdigest()


class SnapshotCache:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}

    def group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group()
        return g

    async def set(self, name: str, res: Resources) -> list[str]:
        """Install new resources for a group; returns the type URLs whose version moved."""
        packed_by_type = {}
        for type_url, items in res.by_type.items():
            packed: dict[str, any_pb2.Any] = {}
            digests: dict[str, bytes] = {}
            for rname, msg in items.items():
                packed[rname], digests[rname] = pack(msg)
            packed_by_type[type_url] = (packed, digests)
        return self._install(name, packed_by_type, replace=True)

    async def patch(self, name: str, type_url: str, upserts: dict[str, object], removes: Iterable[str] = ()) -> bool:
        """Change some resources of one type and keep the rest: the cost follows the change,
        not the table. Returns whether the type's version moved."""
        g = self.group(name)
        old = g.types.get(type_url)
        packed = dict(old.resources) if old else {}
        digests = dict(old.digests) if old else {}
        for rname, msg in upserts.items():
            packed[rname], digests[rname] = pack(msg)
        for rname in removes:
            packed.pop(rname, None)
            digests.pop(rname, None)
        return bool(self._install(name, {type_url: (packed, digests)}, replace=False))

    def _install(self, name: str, by_type: dict[str, tuple[dict[str, any_pb2.Any], dict[str, bytes]]], replace: bool) -> list[str]:
        g = self.group(name)
        moved = []
        for type_url, (packed, digests) in by_type.items():
            old = g.types.get(type_url)
            if old is not None and old.digests == digests:
                continue
            g.types[type_url] = TypeSnapshot(type_version(digests), packed, digests)
            moved.append(type_url)
        if moved:
            g.generation += 1
            old_ev, g.changed = g.changed, asyncio.Event()
            old_ev.set()
        return moved

    def changed_names(self, group: str, type_url: str, since: dict[str, bytes]) -> set[str]:
        snap = self.group(group).types.get(type_url)
        if snap is None:
            return set()
        return {n for n, d in snap.digests.items() if since.get(n) != d}

    def delta(self, group: str, type_url: str, known: dict[str, str], wildcard: bool, subscribed: set[str]) -> DeltaDiff:
        """Resources a delta client lacks or holds an old version of, and names it holds that
        are gone. `known` is name -> version the client has (or was last sent)."""
        snap = self.group(group).types.get(type_url)
        if snap is None:
            return DeltaDiff([], [])
        if wildcard:
            wanted: Iterable[str] = snap.digests.keys()
        else:
            wanted = (n for n in subscribed if n in snap.digests)
        updated = []
        for n in wanted:
            v = snap.digests[n].hex()
            if known.get(n) != v:
                updated.append((n, v, snap.resources[n]))
        removed = [n for n in known if n not in snap.digests and (wildcard or n in subscribed)]
        return DeltaDiff(sorted(updated, key=lambda u: u[0]), sorted(removed))
