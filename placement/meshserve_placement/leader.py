"""The placement leader's shell: the lease, the stream consumers, the commit, and the loops.

Only the lease holder writes placements and orders, and every write is fenced by the lease
inside the same Lua commit, so a deposed leader can never double-book memory. The leader keeps
a ClusterView in memory of the models it has a use for, rebuilt from Redis when it takes the
lease (reload.py; the rest join when asked for): everything it
decides is in Redis (placements, per-pod load queues, exclusions, decision traces), so a new
leader continues exactly where the old one stopped.

The view changes only with its commit: every handler runs inside `_deciding()`, which journals
the view's writes, and `_commit` keeps them once Redis took the commit and takes them back
(ClusterView.rollback) when it did not. A handler that fails anyway is handled again from the
stream's pending list after a reload, never acknowledged as done.

Who does what (docs/design/placement.md): requests to the leader (leader_requests.py), a
decision and its booking (decisions.py over decide.py), sending queued loads (dispatch.py),
load and unload results and pod registrations (events.py over reducers.py), pod liveness
(pods.py), the copy reconcile (maintain.py), rates (rates.py), the view (reload.py).

Traces: a decision is a `placement.decide` span, the child of the context the ms:loadreq entry
(or, for a retry, the loader's ms:events entry) carried; the load order written for it carries
the decision's context, so the pod's pull and load are its children. The context of a queued
load is kept in memory until the order is sent (a new leader sends such orders untraced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator

import aiohttp
import redis.asyncio as aioredis
from opentelemetry import trace
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from meshserve import tracing
from meshserve.model import Copy, ModelSpec, Pod
from meshserve.store import Lease, NotLeader, State
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import KIND_PLACEMENT
from meshserve.settings import Settings
from meshserve_placement import bases
from meshserve_placement.decide import Decision
from meshserve_placement.decisions import Decisions
from meshserve_placement.dispatch import Dispatch
from meshserve_placement.events import Events
from meshserve_placement.leader_requests import Requests
from meshserve_placement.maintain import CopyPlan, Maintain
from meshserve_placement.pods import Pods
from meshserve_placement.rates import Rates
from meshserve_placement.reload import Reload
from meshserve_placement.tuning import Tuning
from meshserve_placement.types import Changes, Ops
from meshserve_placement.view import ClusterView

log = logging.getLogger("meshserve.placement")

GROUP, CONSUMER = k.LEADER_GROUP, k.LEADER_CONSUMER
HANDLER_TRIES = 3  # a stream entry whose handler keeps failing is dropped (logged) after this many
# Stream entries read, handled and committed together (one commit, acknowledged in it). 20,000
# load requests with their results cost 6 round trips and a Lua commit each when handled one at
# a time (bench/density.py); a batch is bounded so other handlers wait at most one batch for the lock.
BATCH = 64


class Scheduler(Reload, Requests, Decisions, Dispatch, Events, Pods, Maintain, Rates):
    def __init__(self, settings: Settings, state: State, tuning: Tuning | None = None):
        self.s, self.state = settings, state
        self.t = tuning or Tuning.from_env()
        self.id = f"placement-{uuid.uuid4().hex[:8]}"
        self.view = ClusterView(pods={}, models={}, horizon_s=self.t.eviction_horizon_seconds)
        self.specs: dict[str, ModelSpec] = {}
        self.aliases: dict[str, str] = {}  # InferenceService name -> its current model (adapters' bases)
        self.pods: dict[str, Pod] = {}
        self.heartbeats: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.reported: dict[str, int] = {}  # model -> the size its last load reported (sizes.py)
        self.waiting: set[str] = set()  # models with a request held by an activator
        # model -> runtime: a request waits for a pool that has no pods yet (scale from zero)
        self.pending: dict[str, str] = {}
        # model -> [since, last asked]: a waiting request's model that fits only once busy,
        # loading or unloading copies free up (Decision.waits_for_room). Retried, oldest
        # first, whenever room may have freed; dropped once no activator asked for it within the
        # cold-start timeout. In memory only: the activator asks again every 2 s while a
        # request waits, so a new leader learns them again within that.
        self.room: dict[str, list[float]] = {}
        # Set when a model starts waiting for room: the room loop, idle at the maintain period
        # while nobody waits, looks again within the landed grace instead (decisions._room_loop).
        self.room_waiters = asyncio.Event()
        self.queues: dict[str, dict[str, float]] = {}  # pod -> model -> priority (mirror of ms:loadq:<pod>)
        self.rates: dict[str, float] = {}  # requests/s per model, from the runtimes' counters
        self.last_added: dict[str, float] = {}
        self._counts: dict[tuple[str, str], int] = {}  # (pod, model) -> last request count seen
        # Rate rounds since this leader took over: rates live in memory only, so a new leader
        # makes no scale-down decision before it has measured them (it would see 0 requests/s
        # everywhere and unload copies that are under load).
        self._rate_rounds = 0
        # The rate poll's per-pod cursor (the latest use each runtime reported) and its count:
        # after a full poll a runtime is asked only for the models used since (rates.py).
        self._rate_since: dict[str, float] = {}
        self._rate_polls = 0
        # Models whose copies the reconcile must look at again (maintain.py).
        self._copyplan = CopyPlan()
        self.stalled: dict[str, str] = {}  # pod -> why: heartbeat stale, runtime still serving
        # pod -> why, as committed to keys.PAUSED (the gateways steer around these); None until
        # read back from Redis after taking the lead, so a previous leader's entries are cleared
        self.paused: dict[str, str] | None = None
        self.pins: set[str] = set()  # models pinned through the repository API (store keys.PINS)
        self._failed_unloads: dict[tuple[str, str], float] = {}  # (model, pod) -> when last ordered
        # (base, pod): superseded bases' copies HELD for the adapters loaded over them, unloaded
        # once those leave (leader_requests._release_held); rebuilt from their reason on reload.
        self._held: set[tuple[str, str]] = set()
        self._moved_aliases: set[str] = set()  # base names whose alias moved since the last spec refresh
        self._rebase_tried: dict[str, float] = {}  # adapter -> when a copy over its new base was last tried (maintain.py)
        self._lastused_seen = 0.0
        self._recent: dict[str, float] = {}  # models used within the busy window -> last use
        self._changes_id, self._changes_rev = "0-0", 0  # how far ms:changes was followed
        self._rebuilds, self._walked = 0, 0  # views rebuilt, and the last one whose registry walk ended (reload.py)
        self.lease = Lease(state.r, k.LEASE, self.id, settings.lease_seconds)
        self._lock = asyncio.Lock()  # one decision at a time: the view is shared by all handlers
        self.leading = asyncio.Event()
        self.last_decisions: OrderedDict[str, Decision] = OrderedDict()  # the newest, for /debug
        self._traces: dict[tuple[str, str], dict[str, str]] = {}  # (pod, model) -> the decision's trace fields, until its order is sent
        self._decided: dict[str, trace.SpanContext] = {}  # model -> its latest decision's span (joined loads link to it)
        # Inside a batch (`_handle_batch`): the commits its handlers made, written as one at its end.
        self._batch: tuple[Ops, Changes] | None = None
        self._prefetched: dict[str, bytes | None] | None = None  # a batch's model specs, read in one round trip
        self._room_tried = self._room_due = False  # a batch's pass over the models waiting for room: done, asked again

    # --- leadership -----------------------------------------------------------------
    async def run(self) -> None:
        while True:
            # A Redis that is down is asked again with exponential backoff and jitter (standbys
            # must not hammer one that is coming back); a lease held by another is looked at
            # again every third of a lease, so a standby takes over within one.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((aioredis.RedisError, OSError)),
                wait=wait_exponential(multiplier=self.s.lease_seconds / 3, max=max(5.0, self.s.lease_seconds)) + wait_random(0, self.s.lease_seconds / 3),
                before_sleep=lambda rs: log.warning("placement: redis error: %s", rs.outcome.exception() if rs.outcome else ""),
            ):
                with attempt:
                    await self._try_lead()
            await asyncio.sleep(self.s.lease_seconds / 3)

    async def _try_lead(self) -> None:
        try:
            if await self.lease.hold():
                log.info("%s took the placement lease", self.id)
                await self._lead()
        except NotLeader:
            log.warning("%s was deposed mid-write", self.id)
        finally:
            self.leading.clear()

    async def _lead(self) -> None:
        # The lease is kept by its own task from the start: taking over 100,000 models takes
        # seconds of parsing, longer than the lease, and a leader that lost its lease while
        # reloading would reload again forever.
        async with self.lease.kept() as lost:
            await self._lead_kept(lost)

    async def _lead_kept(self, lost: asyncio.Event) -> None:
        await self._ensure_groups()
        self._rate_rounds, self.rates, self._counts, self.stalled, self.paused = 0, {}, {}, {}, None
        await self._reload()
        if lost.is_set():
            return
        self.leading.set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(1.0, self.t.rate_poll_seconds))) as http:
            tasks = [
                asyncio.create_task(self._consume(k.LOAD_REQUESTS, self._on_load_request)),
                asyncio.create_task(self._consume(k.EVENTS, self._on_event)),
                asyncio.create_task(self._expire_pods()),
                asyncio.create_task(self._maintain(http)),
                asyncio.create_task(self._room_loop()),
                asyncio.create_task(self._walk_registry()),
            ]
            try:
                while not lost.is_set():
                    await asyncio.wait(tasks, timeout=self.s.lease_seconds / 3, return_when=asyncio.FIRST_COMPLETED)
                    for t in tasks:
                        if t.done() and t.exception():
                            raise t.exception()  # type: ignore[misc]
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _ensure_groups(self) -> None:
        for key in (k.LOAD_REQUESTS, k.EVENTS):
            await cmd.ensure_group(self.state.r, key, GROUP)

    @contextlib.asynccontextmanager
    async def _deciding(self, batch: bool = False) -> AsyncIterator[None]:
        """One decision at a time, and its view writes journaled until committed (`_commit`).
        `batch`: the commits made inside are gathered (`_batch`) for the caller to write as one."""
        async with self._lock:
            view = self.view
            view.begin()
            self._batch = ([], []) if batch else None
            try:
                yield
            except BaseException:
                view.rollback()
                raise
            finally:
                self._batch, self._prefetched = None, None
                view.end()

    async def _consume(self, key: str, handler: Any) -> None:
        cursor = "0"
        failures_seen: dict[bytes, int] = {}
        while True:
            entries = await cmd.read_group(self.state.r, key, GROUP, CONSUMER, cursor, count=BATCH, block=1000)
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            if cursor == ">" and len(entries) > 1 and await self._handle_batch(key, handler, entries):
                continue
            # One at a time: entries re-read after a failure (a failing one is retried alone).
            for eid, fields in entries:
                try:
                    async with self._deciding():
                        await self._handle_entry(handler, fields)
                except NotLeader:
                    raise
                except Exception:
                    # The view's uncommitted writes were taken back; the leader's queues and
                    # waiting sets may still hold the handler's half-made changes: reload them
                    # from Redis, and handle the entry again from the pending list instead of
                    # acknowledging it as done.
                    n = failures_seen[eid] = failures_seen.get(eid, 0) + 1
                    log.exception("placement: handling %s %s failed (try %d of %d); reloading the view", key, fields, n, HANDLER_TRIES)
                    async with self._lock:
                        await self._rebuild()
                    if n < HANDLER_TRIES:
                        cursor = "0"
                        break
                    log.error("placement: dropping %s entry %s after %d failed tries", key, eid, n)
                failures_seen.pop(eid, None)
                await cmd.ack(self.state.r, key, GROUP, eid)

    async def _handle_entry(self, handler: Any, fields: dict[bytes, bytes]) -> None:
        f = {name.decode(): v.decode() for name, v in fields.items()}
        with tracing.handling(f.get("model", ""), f):
            await handler(f)

    async def _handle_batch(self, key: str, handler: Any, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> bool:
        """Handle the entries in order as one transaction: every commit their handlers make is
        written as one at the end, with the entries acknowledged in it; the view's writes are
        kept only then, as for a single entry. False when a handler or the commit failed:
        nothing of the batch is in Redis, the view is reloaded, and the caller handles the
        entries one at a time."""
        try:
            async with self._deciding(batch=True):
                if key == k.LOAD_REQUESTS:
                    await self._prefetch_requests([f for _, f in entries])
                else:
                    self._apply_heartbeats(await self.state.r.zrange(k.HEARTBEATS, 0, -1, withscores=True))
                self._room_tried = self._room_due = False
                await self._retry_room()
                for _, fields in entries:
                    await self._handle_entry(handler, fields)
                if self._room_due:
                    self._room_tried = False
                    await self._retry_room()
                assert self._batch is not None
                ops, changes = self._batch
                ops.append(cmd.ack_entries(key, GROUP, [eid for eid, _ in entries]))
                await self._commit_now(ops, list(dict.fromkeys(changes)))
            return True
        except NotLeader:
            raise
        except Exception:
            log.exception("placement: a batch of %d %s entries failed; reloading the view and handling them one at a time", len(entries), key)
            async with self._lock:
                await self._rebuild()
            return False

    async def _commit(self, ops: Ops, changes: Changes) -> None:
        """Commit fenced by the lease; the view's journaled writes are kept only once it is in.
        Inside a batch the writes join the batch's one commit (`_handle_batch`)."""
        if self._batch is not None:
            self._batch[0].extend(ops)
            self._batch[1].extend(changes)
            return
        await self._commit_now(ops, changes)

    async def _commit_now(self, ops: Ops, changes: Changes) -> int:
        try:
            rev = await self._write(ops, changes)
        except BaseException:
            self.view.rollback()
            raise
        self.view.committed()
        return rev

    async def _write(self, ops: Ops, changes: Changes) -> int:
        if changes:
            return await self.state.commit(ops, changes, fence=self.id)
        # Queue priorities and decision traces: fenced, but not a routing change (no ms:rev bump).
        await self.state.fenced_write(ops, fence=self.id)
        return 0

    def _set_copies(self, model: str, copies: dict[str, Copy], ops: Ops, changes: Changes) -> None:
        """Book a model's new copies in the view (journaled) and in the commit being built."""
        if not self.view.has_over(model):  # nearly always: no copy over a superseded base
            self.view.set_copies(model, copies)
        else:
            before = dict(self.view.over_of(model))
            self.view.set_copies(model, copies)
            ops += bases.over_ops(model, before, self.view.over_of(model))  # the entries of copies that went
        ops.append(cmd.set_copies(model, copies))
        changes.append((KIND_PLACEMENT, model))
