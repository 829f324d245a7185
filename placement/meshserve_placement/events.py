"""The loaders' events on ms:events: load and unload results, and pod registrations. What a
result does to the copies is the pure reducers' (reducers.py); this module commits it, retries
a failed load elsewhere in the same commit, and updates the leader's bookkeeping once the
commit is in."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from meshserve import tracing
from meshserve.model import Copy, CopyState
from meshserve.store import ops as cmd
from meshserve.store.messages import LoadResult, PodRegistered, UnloadOrder, UnloadResult, decode_event
from meshserve_placement import bases
from meshserve_placement import copies as copyplan
from meshserve_placement import reducers
from meshserve_placement.sizes import booked_size
from meshserve_placement.types import Changes, Ops

log = logging.getLogger("meshserve.placement")


class Events:
    async def _on_event(self, f: dict[str, str]) -> None:
        ev = decode_event(f)
        if isinstance(ev, PodRegistered):
            await self._reconcile_pod(ev.pod, dict(ev.sizes))
        elif isinstance(ev, UnloadResult):
            await self._unload_result(ev)
        elif isinstance(ev, LoadResult):
            # A load's result: a span of the decision's trace (the event carries the order's
            # context), so the cold path's hops can be told apart (bench/hops.py).
            with tracing.tracer(__name__).start_as_current_span(
                "placement.loaded", attributes={tracing.ATTR_MODEL: ev.model, tracing.ATTR_POD: ev.pod, "meshserve.ok": ev.ok}
            ):
                await self._load_result(ev)

    async def _load_result(self, ev: LoadResult) -> None:
        model_id, pod, now = ev.model, ev.pod, time.time()
        n = self.attempts.get(model_id, 0) + (0 if ev.ok else 1)
        out = reducers.load_result(self.view.copies.get(model_id, {}), ev, now, n, self.t.max_load_attempts, self.s.failed_pod_exclusion_seconds)
        if out is None:
            return  # withdrawn meanwhile, or an event this leader already applied (replay after failover)
        ops: Ops = []
        changes: Changes = []
        self._set_copies(model_id, out.copies, ops, changes)
        mv = self.view.models.get(model_id)
        if out.size and mv is not None:
            # Reported: later decisions book it, after this copy's eviction too (identical files
            # report the same size, so it stays true). A new ModelView, so its eviction key moves.
            spec = self.specs.get(model_id)
            self.view.set_model(replace(mv, size=booked_size(spec.size_hint if spec else 0, out.size, predicted=spec.predicted_size if spec else 0)))
        if out.exclude_until:
            self.view.exclude(model_id, pod, out.exclude_until)
            ops.append(cmd.exclude(model_id, pod, out.exclude_until))
        spec = self.specs.get(model_id)
        if out.retry and spec is not None:
            # The failure and the retry land in one commit, so nobody sees "failed, nothing pending".
            log.info("retrying load of %s elsewhere (attempt %d): %s", model_id, n + 1, ev.reason)
            await self._place(spec, model_id in self.waiting, ops, changes, why=f"retry after a failed load on {pod}")
            self.attempts[model_id] = n
        else:
            await self._commit(ops, changes)
            self.attempts.pop(model_id, None)
            if not ev.ok:
                self.waiting.discard(model_id)
        if ev.ok:
            if out.size:
                self.reported[model_id] = out.size
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
        if ev.ok or not any(c.state == CopyState.LOADING for c in self.view.copies.get(model_id, {}).values()):
            self._decided.pop(model_id, None)  # the decision's span context: nothing joins it any more
        if not ev.ok:
            # A base that failed to load here fails the adapters queued behind it here (their
            # orders wait for it, bases.waits_for_base): each is retried elsewhere with its base.
            for a in [a for a in self.queues.get(pod, {}) if self.view.copy_base(a, pod) == model_id]:
                await self._load_result(LoadResult(pod, a, False, 0, f"its base {model_id} failed to load here: {ev.reason}"[:300]))
        await self._dispatch(pod)
        await self._retry_room()  # a landed load or a failure: room may have freed

    async def _unload_result(self, ev: UnloadResult) -> None:
        now = time.time()
        out = reducers.unload_result(self.view.copies.get(ev.model, {}), ev, now)
        if out is None:
            return
        ops: Ops = []
        changes: Changes = []
        self._set_copies(ev.model, out, ops, changes)
        await self._commit(ops, changes)
        if ev.ok:
            self._failed_unloads.pop((ev.model, ev.pod), None)
            await self._release_held()  # an adapter gone: a superseded base it kept may go now
        else:
            log.warning("unload of %s on %s failed: %s", ev.model, ev.pod, ev.reason)
            self._failed_unloads[(ev.model, ev.pod)] = now
        await self._dispatch(ev.pod)
        await self._retry_room()  # a finished unload: room may have freed

    async def _reconcile_pod(self, pod: str, held: dict[str, int]) -> None:
        """A (re)started pod says what its runtime really holds. Copies it lost are dropped; what
        it holds that placement does not have there (it had withdrawn the pod while the loader
        was paused) is taken back where placement still wants it, and unloaded otherwise."""
        await self._refresh_pods()
        self.heartbeats[pod] = time.time()
        self.stalled.pop(pod, None)
        ops: Ops = [cmd.forget_withdrawn(pod)]
        changes: Changes = []
        for m in reducers.lost_on_restart(self.view.pod_models(pod), held):
            self._set_copies(m, reducers.without_pod(self.view.copies[m], pod), ops, changes)
        self._mark_health(time.time())
        await self._join_models(held)  # a model it holds may have had no copy when the view was built
        taken = copyplan.adopt(self.view, pod, held, self.rates, self.t)
        now = time.time()
        for m, size in taken.keep.items():
            cs = reducers.without_pod(self.view.copies.get(m, {}), "-")
            cs[pod] = Copy(CopyState.LOADED, size, now, "held by the pod when it registered again")
            self._set_copies(m, cs, ops, changes)
        for m, why in taken.drop.items():
            # UNLOADING books the memory until the loader confirms, and carries no route.
            mv = self.view.models.get(m)
            cs = {**self.view.copies.get(m, {}), pod: Copy(CopyState.UNLOADING, held[m] or (mv.size if mv else 0), now, why)}
            self._set_copies(m, cs, ops, changes)
        # Its adapters may be over an older version of their base that it holds (a base rolled
        # while it was away): counted for that one, which then stays while they do (bases.py).
        names = {m: self.specs[m].alias for m in held if m in self.specs}
        base_names = {m: self.specs[m].base for m in held if m in self.specs and self.specs[m].base}
        for a, b in bases.adopted_over(self.view, pod, held, names, base_names):
            before = dict(self.view.over_of(a))
            self.view.hold_over(a, pod, b)
            ops += bases.over_ops(a, before, self.view.over_of(a))
        for m in taken.drop:
            c = self.view.copies[m][pod]
            c2, now_too = bases.evicted(self.view, m, pod, c, c.since, c.reason)
            if now_too:
                ops.append(cmd.order(pod, UnloadOrder(m)))
            else:  # a base dropped with its adapters: unloaded after them
                self._set_copies(m, {**self.view.copies[m], pod: c2}, ops, changes)
                self._held.add((m, pod))
        if taken.keep or taken.drop:
            log.info("pod %s registered again holding %d models placement had dropped: kept %s, unloading %s",
                     pod, len(taken.keep) + len(taken.drop), sorted(taken.keep), sorted(taken.drop))
        await self._commit(ops, changes)
        for m in taken.keep:
            self.waiting.discard(m)
        await self._dispatch(pod)
