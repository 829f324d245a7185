"""Deciding one more copy of a model (decide.place) and booking it: the decision trace, the
evictions' unload orders, the LOADING copy and its place in the pod's load queue; and the
models held while they wait for room to free up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from opentelemetry import trace

from meshserve import failures, tracing
from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import UnloadOrder
from meshserve_placement import bases
from meshserve_placement.decide import Decision, generic_refusal, place
from meshserve_placement.types import Changes, Ops
from meshserve_placement.view import QUEUED  # noqa: F401 - also read from here (e2e)

log = logging.getLogger("meshserve.placement")

LAST_DECISIONS = 10_000  # kept in memory for the debug endpoint; ms:decisions has them all


class Decisions:
    async def _place(self, spec: ModelSpec, waiting: bool, ops: Ops | None = None, changes: Changes | None = None, why: str = "") -> bool:
        """Decide one more copy of `spec`; commit it together with any `ops` the caller has pending."""
        with tracing.tracer(__name__).start_as_current_span(
            "placement.decide", attributes={tracing.ATTR_MODEL: spec.id, "meshserve.waiting": waiting, "meshserve.why": why}
        ) as span:
            self._decided[spec.id] = span.get_span_context()
            return await self._decide(spec, waiting, ops, changes, why, span)

    async def _decide(self, spec: ModelSpec, waiting: bool, ops: Ops | None, changes: Changes | None, why: str, span: trace.Span) -> bool:
        ops = list(ops or [])
        changes = list(changes or [])
        now = time.time()
        self._mark_health(now)
        mv = self.view.models[spec.id]
        decision = place(mv, self.view, now)
        span.set_attributes({"meshserve.outcome": "placed" if decision.pod else "unplaceable", "meshserve.reason": decision.reason or ""})
        self.last_decisions[spec.id] = decision
        self.last_decisions.move_to_end(spec.id)
        if len(self.last_decisions) > LAST_DECISIONS:
            self.last_decisions.popitem(last=False)  # ms:decisions keeps every model's, for explain
        record = {**decision.to_dict(), "ts": now, "leader": self.id, "why": why or ("a request is waiting" if waiting else "")}
        ops.append(cmd.set_decision(spec.id, record))
        if decision.pod is None and decision.waits_for and waiting:
            # The request stays held: placed again once a pod of that runtime registers.
            log.info("%s waits for a pod of %s: %s", spec.id, decision.waits_for, decision.reason)
            await self._commit(ops, changes)
            self.pending[spec.id] = decision.waits_for
            return False
        if decision.pod is None and self._room_frees(spec.id, decision) and waiting:
            # No 503: the room is booked by copies that free up by themselves. The request stays
            # held and the model is retried as room frees (_retry_room), up to the cold-start timeout.
            log.info("%s waits for room: %s", spec.id, decision.reason)
            await self._commit(ops, changes)
            self.room.setdefault(spec.id, [now, now])[1] = now
            self.room_waiters.set()
            return False
        if decision.pod is None:
            log.warning("cannot place %s: %s", spec.id, decision.reason)
            if waiting:
                # Tell the waiting activators: a "-" pseudo-copy carries the reason to the 503.
                copies = dict(self.view.copies.get(spec.id, {}))
                copies["-"] = Copy(CopyState.FAILED, 0, now, _placement_reason(decision, copies))
                self._set_copies(spec.id, copies, ops, changes)
            await self._commit(ops, changes)
            if waiting:
                self.waiting.discard(spec.id)
            return False
        pod = decision.pod
        span.set_attributes({tracing.ATTR_POD: pod, "meshserve.evict": list(decision.evict)})
        carried = dict(tracing.inject({}))  # the orders below carry this decision's context
        for victim in decision.evict:  # adapters before their base (ClusterView.victims)
            vc = dict(self.view.copies[victim])
            vc[pod], now_too = bases.evicted(self.view, victim, pod, vc[pod], now, f"evicted to make room for {spec.id}")
            self._set_copies(victim, vc, ops, changes)
            # Unloads never wait for a slot: they free the memory the load was promised. A base
            # evicted with its adapters waits for theirs (leader_requests._release_held).
            if now_too:
                ops.append(cmd.order(pod, UnloadOrder(victim, carried)))
            else:
                self._held.add((victim, pod))
        copies = {p: c for p, c in self.view.copies.get(spec.id, {}).items() if p != "-"}
        prio = now + (0.0 if waiting else k.BACKGROUND)
        queued = [(spec.id, prio, carried)]
        if decision.with_base:
            # The adapter's base is booked on the pod once, as a copy of its own model, queued
            # just ahead of the adapter, whose order waits until it is LOADED (bases.py).
            bm = self.view.models[decision.base]
            bc = {p: c for p, c in self.view.copies.get(decision.base, {}).items() if p != "-"}
            bc[pod] = Copy(CopyState.LOADING, bm.size, now, f"{QUEUED}; the base of {spec.id}")
            self._set_copies(decision.base, bc, ops, changes)
            ops.append(cmd.enqueue(pod, decision.base, bases.base_priority(prio)))
            queued.insert(0, (decision.base, bases.base_priority(prio), carried))
        copies[pod] = Copy(CopyState.LOADING, mv.size, now, QUEUED)
        self._set_copies(spec.id, copies, ops, changes)
        ops.append(cmd.enqueue(pod, spec.id, prio))
        log.info("placing %s on %s%s%s%s", spec.id, pod, f" with its base {decision.base}" if decision.with_base else "",
                 f" evicting {decision.evict}" if decision.evict else "", f" ({why})" if why else "")
        # The decision and, when the pod has a free slot and the room, its load order go in one
        # commit: one round trip fewer between a cold request and its load (issue 19 §4).
        await self._dispatch(pod, ops, changes, queued=queued)
        return True

    def _room_frees(self, model: str, d: Decision) -> bool:
        """The decision found no room, but room will free by itself: copies that are busy,
        loading or unloading (policy), or a copy of this very model still unloading (a version
        retired a moment ago and asked for again by a rollback: once it is gone, the pod can
        take the model again)."""
        return d.waits_for_room or any(c.state == CopyState.UNLOADING for c in self.view.copies.get(model, {}).values())

    async def _retry_room(self) -> None:
        """Place the models waiting for room that fit now, oldest first. Called (under the
        lock) when room may have freed: a load landed, an unload finished, a load request came,
        and every maintain period (requests finish and their copies leave the busy window)."""
        if not self.room:
            return
        if self._batch is not None and self._room_tried:
            # Within a batch one pass at its start and one at its end do: a pass per entry was
            # O(waiting models) each, 64 times a batch (bench/density.py). Older waiters still
            # go first: the start's pass runs before any entry of the batch is handled.
            self._room_due = True
            return
        self._room_tried = self._batch is not None
        now = time.time()
        self._mark_health(now)
        # (runtime, format, size) that found no room in this pass for reasons no model of its own made
        # (decide.generic_refusal): another waiting model of that runtime, format and size would get the
        # same verdict from the same view, so it is not decided again. Without this a pass cost
        # one decision per waiting model and ran on every load request, result and 0.25 s:
        # quadratic in the waiting models, which saturated the leader under churn (issue 19 §3).
        nofit: set[tuple[str | None, str, int]] = set()
        for model, (since, asked) in sorted(self.room.items(), key=lambda kv: (kv[1][0], kv[0])):
            spec, mv = self.specs.get(model), self.view.models.get(model)
            placed = any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in self.view.copies.get(model, {}).values())
            if spec is None or mv is None or placed or model not in self.waiting:
                del self.room[model]
                continue
            if now - asked > self.s.cold_start_timeout_seconds:
                # Every request that waited for it has timed out at its activator by now.
                log.warning("%s: no request waits for room any more after %.0fs; given up", model, now - since)
                del self.room[model]
                self.waiting.discard(model)
                continue
            # Pure and cheap: only a model that now fits goes through a decision that commits.
            cls = (self.view.serving_runtime(mv), mv.format, mv.size)
            if cls in nofit:
                continue
            d = place(mv, self.view, now)
            if d.pod is None and self._room_frees(model, d) and generic_refusal(d):
                nofit.add(cls)
            if d.pod is not None or not self._room_frees(model, d):
                del self.room[model]
                await self._place(spec, waiting=True, why=f"room freed up after {now - since:.1f}s waiting")

    async def _room_loop(self) -> None:
        # Room also frees without an event: a just-landed copy passes the policy's landed
        # grace (1 s) and becomes evictable. While requests wait, look a few times within that
        # grace rather than once a maintain period (a retry is a pure decision until it fits).
        while True:
            quick = min(self.t.maintain_seconds, self.view.landed_grace_s / 4)
            if not self.room:
                # A sleep of the whole period begun while nobody waited would hold the first
                # waiter's retries for up to that period. (Measured: not what made the churn
                # tail's 1 s; that was the activator's ask dedupe, docs/benchmarks.md "Churn".)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
                # of a lost lease that lands as a waiter arrives, and this loop outlived its term.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.t.maintain_seconds):
                        await self.room_waiters.wait()
            self.room_waiters.clear()
            if self.room:
                await asyncio.sleep(quick)
            async with self._deciding():
                await self._retry_room()


def _placement_reason(decision: Decision, copies: dict[str, Copy]) -> str:
    """The reason a waiting request is told: the decision's, tagged with the kind of the latest
    load failure when that failure is why pods refused the model (so a client keeps reading
    "could not load the model's files", not "no runtime pod can hold it", after its retries)."""
    if decision.refused_after_failures():
        failed = [(c.since, kind) for p, c in copies.items()
                  if p != "-" and c.state == CopyState.FAILED and (kind := failures.kind_of(c.reason))]
        if failed:
            return failures.tag(max(failed)[1], decision.reason)
    return decision.reason
