"""The loaders' events on ms:events: load and unload results, and pod registrations. The
state changes are the pure reducers' (reducers.py); this module commits them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from opentelemetry import trace
from prometheus_client import Histogram

from meshserve import state as st
from meshserve import tracing
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve_placement import copies as copyplan
from meshserve_placement import keys, policy
from meshserve_placement.sizes import booked_size, reported_of
from meshserve_placement.liveness import Liveness, judge
from meshserve_placement.types import Changes, Ops

log = logging.getLogger("meshserve.placement")


class Events:
    async def _on_event(self, f: dict[str, str]) -> None:
        if f.get("op") == "register":
            sizes = {m: int(n) for m, n in json.loads(f.get("sizes") or "{}").items()}
            await self._reconcile_pod(f["pod"], {m: sizes.get(m, 0) for m in json.loads(f.get("models") or "[]")})
            return
        if f.get("op") != "load":
            await self._apply_event(f)
            return
        # A load's result: a span of the decision's trace (the event carries the order's
        # context), so the cold path's hops can be told apart (bench/hops.py).
        with tracing.tracer(__name__).start_as_current_span(
            "placement.loaded", attributes={tracing.ATTR_MODEL: f.get("model", ""), tracing.ATTR_POD: f.get("pod", ""), "meshserve.ok": f.get("ok") == "1"}
        ):
            await self._apply_event(f)

    async def _apply_event(self, f: dict[str, str]) -> None:
        model_id, pod, op, ok = f["model"], f["pod"], f["op"], f.get("ok") == "1"
        now = time.time()
        copies = dict(self.view.copies.get(model_id, {}))
        cur = copies.get(pod)
        ops: Ops = []
        changes: Changes = []
        if op == "load":
            if cur is None or cur.state != CopyState.LOADING:
                return  # withdrawn meanwhile, or an event this leader already applied (replay after failover)
            if ok:
                size = int(f.get("size") or 0) or cur.size
                copies[pod] = Copy(CopyState.LOADED, size, now)
                mv = self.view.models.get(model_id)
                if size:
                    # Reported: later decisions book it, after this copy's eviction too (identical
                    # files report the same size, so it stays true).
                    self.reported[model_id] = size
                    if mv is not None:
                        spec = self.specs.get(model_id)
                        mv.size = booked_size(spec.size_hint if spec else 0, size)
                if model_id in self.waiting:
                    # Held requests are forwarded to it right now, before any runtime counter or
                    # ms:lastused says so: busy from this moment, or the next decision could evict
                    # it under the request the activator is about to forward.
                    self.view.touch(model_id, now)
                    self._recent[model_id] = now
                    self.view.in_flight.add(model_id)
                elif model_id not in self.view.last_used:
                    self.view.touch(model_id, now)
                self.waiting.discard(model_id)
            else:
                reason = f.get("reason", "")
                copies[pod] = Copy(CopyState.FAILED, 0, now, reason)
                until = now + self.s.failed_pod_exclusion_seconds
                self.view.excluded[(model_id, pod)] = until
                ops.append(["HSET", keys.EXCLUDED, f"{model_id}|{pod}", until])
        elif op == "unload":
            if cur is None:
                return
            if not ok:
                # The pod still holds it: the copy stays UNLOADING (its memory booked, so the load
                # queued behind this eviction waits instead of pushing the pod over), and the
                # unload is ordered again by the copy reconcile (UNLOAD_RETRY_SECONDS).
                log.warning("unload of %s on %s failed: %s", model_id, pod, f.get("reason", ""))
                copies[pod] = Copy(CopyState.UNLOADING, cur.size, now, f"unload failed: {f.get('reason', '')}"[:300])
                self._failed_unloads[(model_id, pod)] = now
            else:
                copies.pop(pod, None)
                self._failed_unloads.pop((model_id, pod), None)
        self._set_copies(model_id, copies, ops, changes)
        if op == "load" and (ok or not any(c.state == CopyState.LOADING for c in copies.values())):
            self._decided.pop(model_id, None)  # the decision's span context: nothing joins it any more
        if op == "load" and not ok:
            n = self.attempts.get(model_id, 0) + 1
            self.attempts[model_id] = n
            spec = self.specs.get(model_id)
            others = any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in copies.values())
            if spec is not None and n < self.t.max_load_attempts and not others:
                # The failure and the retry land in one commit, so nobody sees "failed, nothing pending".
                log.info("retrying load of %s elsewhere (attempt %d): %s", model_id, n + 1, f.get("reason"))
                await self._place(spec, model_id in self.waiting, ops, changes, why=f"retry after a failed load on {pod}")
                await self._dispatch(pod)
                await self._retry_room()
                return
            self.waiting.discard(model_id)
            self.attempts.pop(model_id, None)
        elif op == "load":
            self.attempts.pop(model_id, None)
        await self._commit(ops, changes)
        await self._dispatch(pod)
        await self._retry_room()  # a landed load, a finished unload or a failure: room may have freed

    async def _reconcile_pod(self, pod: str, held: dict[str, int]) -> None:
        """A (re)started pod says what its runtime really holds. Copies it lost are dropped; what
        it holds that placement does not have there (it had withdrawn the pod while the loader
        was paused) is taken back where placement still wants it, and unloaded otherwise."""
        await self._refresh_pods()
        self.heartbeats[pod] = time.time()
        self.stalled.pop(pod, None)
        ops: Ops = [["HDEL", st.WITHDRAWN, pod]]
        changes: Changes = []
        for m, c in list(self.view.pod_models(pod).items()):
            # LOADING copies stay: their orders are still in the pod's stream, and the agent
            # re-reads the ones it had not finished, so re-sending would load twice.
            if m not in held and c.state in (CopyState.LOADED, CopyState.UNLOADING):
                rest = {p: x for p, x in self.view.copies[m].items() if p != pod}
                self._set_copies(m, rest, ops, changes)
        self._mark_health(time.time())
        taken = copyplan.adopt(self.view, pod, held, self.rates, self.t)
        now = time.time()
        for m, size in taken.keep.items():
            cs = {p: c for p, c in self.view.copies.get(m, {}).items() if p != "-"}
            cs[pod] = Copy(CopyState.LOADED, size, now, "held by the pod when it registered again")
            self._set_copies(m, cs, ops, changes)
        for m, why in taken.drop.items():
            # UNLOADING books the memory until the loader confirms, and carries no route.
            cs = dict(self.view.copies.get(m, {}))
            mv = self.view.models.get(m)
            cs[pod] = Copy(CopyState.UNLOADING, held[m] or (mv.size if mv else 0), now, why)
            self._set_copies(m, cs, ops, changes)
            ops.append(["XADD", st.orders_key(pod), "*", "op", "unload", "model", m])
        if taken.keep or taken.drop:
            log.info("pod %s registered again holding %d models placement had dropped: kept %s, unloading %s",
                     pod, len(taken.keep) + len(taken.drop), sorted(taken.keep), sorted(taken.drop))
        await self._commit(ops, changes)
        for m in taken.keep:
            self.waiting.discard(m)
        await self._dispatch(pod)
