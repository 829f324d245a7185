"""Versioned snapshots per node group, as go-control-plane's cache keeps them.

A snapshot holds each resource already packed into an Any, so a change is serialized once per
group however many gateways are connected. Per-type versions only move when that type's
content changed, so an unrelated change never re-sends (or re-warms) anything.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from google.protobuf import any_pb2

from meshserve_xds.resources import Resources


@dataclass
class TypeSnapshot:
    version: str
    resources: dict[str, any_pb2.Any]
    digests: dict[str, bytes]


@dataclass
class Group:
    types: dict[str, TypeSnapshot] = field(default_factory=dict)
    generation: int = 0
    # Replaced on every change: a waiter takes the current event, then waits on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class SnapshotCache:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self._counter = 0

    def group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group()
        return g

    async def set(self, name: str, res: Resources) -> list[str]:
        """Install new resources for a group; returns the type URLs whose version moved."""
        g = self.group(name)
        moved = []
        for type_url, items in res.by_type.items():
            old = g.types.get(type_url)
            packed: dict[str, any_pb2.Any] = {}
            digests: dict[str, bytes] = {}
            for rname, msg in items.items():
                a = any_pb2.Any()
                a.Pack(msg)  # type: ignore[arg-type]
                packed[rname] = a
                digests[rname] = hashlib.blake2b(a.value, digest_size=16).digest()
            if old is not None and old.digests == digests:
                continue
            self._counter += 1
            g.types[type_url] = TypeSnapshot(str(self._counter), packed, digests)
            moved.append(type_url)
        if moved:
            g.generation += 1
            old, g.changed = g.changed, asyncio.Event()
            old.set()
        return moved

    def changed_names(self, group: str, type_url: str, since: dict[str, bytes]) -> set[str]:
        snap = self.group(group).types.get(type_url)
        if snap is None:
            return set()
        return {n for n, d in snap.digests.items() if since.get(n) != d}
