"""Requests to the leader on ms:loadreq (messages.LoadRequest): a load (the activator,
`meshserve load`), a pin or unpin (the repository API), a withdraw or retire (the rollout
controller). Only the leader writes placements and orders; everyone else asks here."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from opentelemetry import trace

from meshserve import tracing
from meshserve.model import CopyState, ModelSpec
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import LoadRequest, UnloadOrder
from meshserve_placement import bases
from meshserve_placement.types import Changes, Ops
from meshserve_placement.view import HELD

log = logging.getLogger("meshserve.placement")


class Requests:
    async def _on_load_request(self, f: dict[str, str]) -> None:
        req = LoadRequest.decode(f)
        model_id, op = req.model, req.op
        if op in ("pin", "unpin"):
            if not await self._set_pin(model_id, op == "pin") or op == "unpin":
                return
        if op in ("withdraw", "retire"):
            await self._retire(model_id, orders=op == "retire", why=req.why)
            return
        copies = self.view.copies.get(model_id, {})
        if any(c.state == CopyState.LOADED for c in copies.values()):
            return
        if any(c.state == CopyState.LOADING for c in copies.values()):
            # Many requests for one cold model make one load; a waiting request moves it up the queue.
            # Its trace gets a decision span of its own that links to the decision being carried out.
            made = self._decided.get(model_id)
            with tracing.tracer(__name__).start_as_current_span(
                "placement.decide", attributes={tracing.ATTR_MODEL: model_id, "meshserve.outcome": "joined the load in progress"},
                links=[trace.Link(made)] if made else None,
            ):
                await self._prioritise(model_id)
            return
        if any(c.state == CopyState.UNLOADING and c.reason.startswith(HELD) for c in copies.values()):
            # A superseded base still kept for its adapters, asked for again (by its id, or the
            # rollout moving back to it): it serves again where it is, no load (bases.revived).
            ops: Ops = []
            changes: Changes = []
            self._set_copies(model_id, bases.revived(copies, time.time()), ops, changes)
            log.info("%s asked for again: its copies kept for its adapters serve again", model_id)
            await self._commit(ops, changes)
            self._held = {(m, p) for m, p in self._held if m != model_id}
            return
        if model_id in self.room:
            self.room[model_id][1] = time.time()  # still wanted: keep it waiting
            await self._retry_room()
            return
        spec = await self._request_spec(model_id)
        if spec is None:
            return
        # Requests already waiting for room go first: a newcomer must not take the room they wait for.
        await self._retry_room()
        self.attempts[model_id] = 0
        self.waiting.add(model_id)
        await self._place(spec, waiting=True)

    async def _prefetch_requests(self, entries: list[dict[bytes, bytes]]) -> None:
        """A batch of requests: the specs of the models they name and the pods, in one round
        trip for the batch instead of one per request (`_request_spec`)."""
        ids = sorted({m.decode() for f in entries if (m := f.get(b"model"))})
        async with self.state.r.pipeline(transaction=False) as p:
            p.hmget(k.MODELS, ids).hgetall(k.PODS).hgetall(k.RUNTIMES).zrange(k.HEARTBEATS, 0, -1, withscores=True)
            raw_specs, raw, raw_runtimes, hb = await p.execute()
        self._apply_pods(raw, raw_runtimes)
        self._apply_heartbeats(hb)
        self._prefetched = dict(zip(ids, raw_specs))

    def _apply_heartbeats(self, hb: list[tuple[bytes, float]]) -> None:
        """The pods' heartbeats as of this batch. The liveness loop reads them too, but only
        between two holds of the lock: a leader busy with batches back to back judged every
        pod's heartbeat late, and each of its decisions then waited for room at O(the pod's
        models) (bench/density.py)."""
        self.heartbeats.update((p.decode(), v) for p, v in hb)

    async def _request_spec(self, model_id: str) -> ModelSpec | None:
        """The model's spec, fresh (annotations: min/max/pinned may change): read with its
        batch (`_prefetch_requests`), else now with the pods (`_refresh_model_and_pods`)."""
        if self._prefetched is None or model_id not in self._prefetched:
            return await self._refresh_model_and_pods(model_id)
        raw = self._prefetched[model_id]
        if not raw:
            return self.specs.get(model_id)
        spec = ModelSpec.from_json(raw)
        self._apply_spec(spec)
        return spec

    async def _retire(self, model_id: str, orders: bool, why: str) -> None:
        """A superseded version, on the rollout controller's request (it asks; only the leader
        writes placements and orders). `withdraw`: its loaded copies become UNLOADING, which takes
        their routes away while their memory stays booked. `retire`, a little later, once the
        gateways stopped sending there: the unload orders.

        A base rolled to a new version (bases.py): its adapters are re-pointed to the new
        version first, and a copy with adapters still loaded over it is HELD (no route, still
        booked) instead, its unload ordered once the last of them left (`_release_held`)."""
        await self._repoint_adapters(model_id)
        ops: Ops = []
        changes: Changes = []
        cs, send = bases.retire(self.view, model_id, orders, time.time(), why or "superseded by a new version")
        for pod in send:
            ops.append(cmd.order(pod, UnloadOrder(model_id)))
        if cs != self.view.copies.get(model_id, {}):
            self._set_copies(model_id, cs, ops, changes)
        kept = bases.held(self.view, {model_id: cs})
        if ops:
            log.info("%s %s: %s%s", "retiring" if orders else "withdrawing", model_id, why or "superseded by a new version",
                     f"; kept booked on {sorted(p for _, p in kept)} for the adapters loaded over it" if kept else "")
            await self._commit(ops, changes)
        self._held |= kept

    async def _repoint_adapters(self, base: str) -> None:
        """`base` is superseded (its name moved, reload._follow_bases, or it is being withdrawn):
        the adapters whose base it is follow their base's name to its current model now, not
        when their specs are next read, so their next loads go over the new version
        (ClusterView.set_model keeps the copies loaded over the old one counted for it). The
        names are read again here: the alias moved a few seconds before the withdrawal
        (rollout DRAIN_S), and the spec refresh may not have followed it yet."""
        # The names adapters use that meant it: by the leader's aliases, or its own InferenceService
        # name (the aliases may have followed it already). Read again even with no adapter in
        # the view: one asked for later must resolve its base to the new version.
        own = self.specs[base].alias if base in self.specs else ""
        names = sorted({n for n, i in self.aliases.items() if i == base} | ({own} if own in self.aliases else set()))
        if not names:
            return
        for spec in await self._refresh_bases(names):
            self._apply_spec(spec)
        moved = []
        ops: Ops = []
        for a in sorted(self.view.adapters_of(base)):
            spec, mv = self.specs.get(a), self.view.models.get(a)
            if spec is None or mv is None:
                continue
            new = bases.resolve_base(spec.base, self.aliases, self.specs)
            if new and new != base:
                before = dict(self.view.over_of(a))
                self.view.set_model(replace(mv, base=new))
                ops += bases.over_ops(a, before, self.view.over_of(a))
                moved.append(a)
        if ops:  # which copies are over the old version: a new leader reads it back (reload.py)
            await self._commit(ops, [])
        if moved:
            log.info("%s superseded: %d adapters now load over %s", base, len(moved), self.aliases.get(names[0], "?"))

    async def _release_held(self) -> None:
        """Base copies waiting for their adapters (HELD superseded versions, bases evicted with
        their adapters) whose adapters all left their pod: the unload orders go now."""
        if not self._held:
            return
        ops: Ops = []
        changes: Changes = []
        go = bases.releasable(self.view, self._held)
        for m, pod in go:
            self._set_copies(m, {**self.view.copies[m], pod: bases.released(self.view.copies[m][pod])}, ops, changes)
            ops.append(cmd.order(pod, UnloadOrder(m)))
        if ops:
            log.info("unloading bases no adapter uses any more: %s", ", ".join(f"{m} on {p}" for m, p in go))
            await self._commit(ops, changes)
        self._held = {(m, p) for m, p in self._held if (c := self.view.copies.get(m, {}).get(p)) is not None and bases.waits_for_adapters(c)}

    async def _set_pin(self, model_id: str, pinned: bool) -> bool:
        """The repository API's load (pin) and unload (unpin). A pinned model keeps at least one
        copy and is never evicted, exactly as the `meshserve.io/pinned` annotation makes it;
        dropping the pin leaves its copies to the cache's ordinary eviction. False for a model
        that is not registered."""
        spec = await self._refresh_model_and_pods(model_id)
        if spec is None:
            return False
        if pinned:
            await self._commit([cmd.pin(model_id, time.time())], [])
            self.pins.add(model_id)
        else:
            await self._commit([cmd.unpin(model_id)], [])
            self.pins.discard(model_id)
        mv = self.view.models.get(model_id)
        if mv is not None:
            self.view.set_model(replace(mv, pinned=spec.pinned or model_id in self.pins))
        log.info("%s %s through the repository API", model_id, "pinned" if pinned else "unpinned")
        return True

    async def _prioritise(self, model_id: str) -> None:
        self.waiting.add(model_id)
        mv = self.view.models.get(model_id)
        base = mv.base if mv is not None else ""
        for pod, q in list(self.queues.items()):  # a dispatch drops the queues it empties
            prio = q.get(model_id)
            if prio is not None and prio >= k.BACKGROUND:
                # An adapter's base queued on the same pod moves up with it: the adapter waits for it.
                moved = [m for m in (base, model_id) if m and m in q and q[m] >= k.BACKGROUND]
                await self._commit([cmd.enqueue(pod, m, q[m] - k.BACKGROUND) for m in moved], [])
                for m in moved:
                    q[m] -= k.BACKGROUND
                await self._dispatch(pod)
