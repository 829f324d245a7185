"""Which revision each connected gateway's routes reflect, published for the loaders
(keys.XDS_SYNCED, messages.GatewaySync).

An eviction withdraws the copy's route and orders its unload in one commit. The loader must not
drop the model before every gateway applied the withdrawal, or a request routed there meanwhile
gets a 404 for a registered model. It used to wait a fixed `unload_grace_seconds` (0.5 s),
which was the whole of a cold start into a full cache (issue 19). A gateway that ACKed every
route type of the group's current snapshot holds the routes as of the revision the source
built it from, so the loader can unload as soon as every gateway is there (the grace stays
the bound).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Mapping

from meshserve.store import State
from meshserve.store import ops
from meshserve.store.messages import GatewaySync
from meshserve_xds.stream import KEEP_SUFFIX, Stream

log = logging.getLogger("meshserve.xds")

PERIOD_S = 0.01  # how often ACKs are looked at: a small part of the debounce plus the push
REFRESH_S = 1.0  # every entry is rewritten this often, so a live one never goes stale


def caught_up(ss: Stream) -> bool:
    """Has this gateway ACKed the group's current snapshot of every type it subscribes to?
    Routes and endpoints both: a withdrawn copy leaves a route or a cluster's endpoints. A
    cluster list that still carries clusters being removed (KEEP_SUFFIX) counts: no route
    names them any more."""
    g = ss.cache.group(ss.group)
    for t, ts in ss.types.items():
        snap = g.types.get(t)
        if not ts.subscribed or snap is None:
            continue
        if ts.pending or ts.acked_version not in (snap.version, snap.version + KEEP_SUFFIX):
            return False
    return True


def synced_revs(streams: Mapping[str, Stream], rev: int, before: Mapping[str, int]) -> dict[str, int]:
    """Pure. Field -> revision for every stream that said who it is: `rev` (the revision the
    cache's snapshots were built from) once its gateway ACKed all of them (`caught_up`), else
    what it was at before (0 for a gateway that never caught
    up: it is known, and behind)."""
    out: dict[str, int] = {}
    for sid, ss in streams.items():
        if not ss.group:
            continue
        field = f"{ss.node_id}/{sid}"
        out[field] = rev if caught_up(ss) else before.get(field, 0)
    return out


class SyncReporter:
    def __init__(self, streams: Mapping[str, Stream], rev: Callable[[], int], state: State):
        self.streams, self.rev, self.state = streams, rev, state
        self.written: dict[str, int] = {}

    async def run(self) -> None:
        refreshed = 0.0
        try:
            while True:
                await asyncio.sleep(PERIOD_S)
                now = time.time()
                want = synced_revs(self.streams, self.rev(), self.written)
                refresh = now - refreshed >= REFRESH_S
                put = {f: GatewaySync(r, now) for f, r in want.items() if refresh or self.written.get(f) != r}
                gone = [f for f in self.written if f not in want]
                if not put and not gone:
                    continue
                try:
                    await ops.report_synced(self.state.r, put, gone)
                except Exception as e:  # noqa: BLE001 - loaders fall back to their fixed grace
                    log.warning("xds: could not publish the gateways' revisions: %s", e)
                    continue
                self.written = want
                if refresh:
                    refreshed = now
        finally:
            if self.written:
                try:
                    await ops.report_synced(self.state.r, {}, list(self.written))
                except Exception:  # noqa: BLE001 - the entries go stale by themselves
                    pass
