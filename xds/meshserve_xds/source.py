"""Feeds the snapshot cache from Redis: reads routing state, builds resources, debounces bursts.

Changes arrive on the `ms:changes` stream. Bursts are batched: a push waits for a quiet
window (default 20 ms) but never longer than a maximum delay (default 200 ms) after the first
change, so a storm of loads becomes a handful of pushes while a lone change lands fast.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from meshserve import state as st
from meshserve.model import CopyState
from meshserve.rules import store as rules_store
from meshserve.settings import Settings
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import GATEWAY_GROUP, ISTIO_GROUP

log = logging.getLogger("meshserve.xds")

M_BUILD = Histogram("meshserve_xds_build_seconds", "Time to read state and build all resources",
                    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
M_REV = Gauge("meshserve_xds_state_revision", "Redis state revision the current snapshot reflects")
M_RESYNCS = Counter("meshserve_xds_resyncs", "Full rebuilds from Redis")


def routing_state(snap: st.Snapshot, settings: Settings) -> r.RoutingState:
    pods = {p.id: r.Endpoint(p.host, p.rest_port, p.grpc_port) for p in snap.pods.values()}
    loaded: dict[str, list[str]] = {}
    for model, copies in snap.placements.items():
        holders = sorted(p for p, c in copies.items() if c.state == CopyState.LOADED and p in pods)
        if holders:
            loaded[model] = holders
    return r.RoutingState(
        pods=pods,
        loaded=loaded,
        aliases=dict(snap.aliases),
        activator=r.Endpoint(settings.host, settings.activator_rest_port, settings.activator_grpc_port),
        cold_timeout_s=settings.cold_start_timeout_seconds + 5,
    )


class RedisSource:
    def __init__(self, settings: Settings, state: st.State, cache: SnapshotCache):
        self.s, self.state, self.cache = settings, state, cache
        self.listeners = r.ListenerConfig(settings.host, settings.gateway_rest_port, settings.gateway_grpc_port)
        self.rev = 0

    async def rebuild(self) -> None:
        t0 = time.perf_counter()
        snap = await self.state.snapshot()
        rs = routing_state(snap, self.s)
        rs.traffic = await rules_store.plans(self.state, snap.aliases, set(snap.models))
        await self.cache.set(GATEWAY_GROUP, r.build_all(rs, self.listeners))
        await self.cache.set(ISTIO_GROUP, r.build_all(rs, None))
        self.rev = snap.rev
        M_REV.set(snap.rev)
        M_RESYNCS.inc()
        M_BUILD.observe(time.perf_counter() - t0)

    async def run(self) -> None:
        quiet = self.s.debounce_quiet_ms / 1000
        max_delay = self.s.debounce_max_ms / 1000
        while True:
            try:
                last = await self.state.last_change_id()
                await self.rebuild()
                log.info("xds: built snapshot at revision %d", self.rev)
                while True:
                    resp = await self.state.r.xread({st.CHANGES: last}, block=1000, count=10_000)
                    if not resp:
                        continue
                    first = time.monotonic()
                    last = resp[0][1][-1][0]
                    # Debounce: keep reading while changes keep coming, up to the max delay.
                    while time.monotonic() - first < max_delay:
                        more = await self.state.r.xread(
                            {st.CHANGES: last}, block=max(1, int(quiet * 1000)), count=10_000
                        )
                        if not more:
                            break
                        last = more[0][1][-1][0]
                    await self.rebuild()
            except Exception as e:  # Redis gone: keep serving the last snapshot, retry
                log.warning("xds: state source error (%s); serving last snapshot, retrying", e)
                await asyncio.sleep(1.0)
