"""The placement leader: turns load requests and loader events into placements and orders.

Only the lease holder writes placements, and every write is fenced by the lease inside the
same Lua commit, so a deposed leader can never double-book memory. The leader keeps a
ClusterView in memory, rebuilt from Redis when it takes the lease: everything it decides is
in Redis (placements, per-pod load queues, exclusions, decision traces), so a new leader
continues exactly where the old one stopped.

Loads: memory is reserved when a load is decided (the copy is LOADING from then on). The
order goes to the pod at once when the pod has a free loading slot (Pod.max_loading), else
into the pod's load queue (ms:loadq:<pod>), where a load with a request waiting goes first.

Signals: recency from ms:lastused (loaders copy it from the runtimes' own counters; the
activator adds cold hits), request rates and counts from the runtimes' counters
(GET /v2/meshserve/stats on each pod, every rate_poll_seconds). No Python on the data path.

Traces: a decision is a `placement.decide` span, the child of the context the ms:loadreq entry
(or, for a retry, the loader's ms:events entry) carried; the load order written for it carries
the decision's context, so the pod's pull and load are its children. The context of a queued
load is kept in memory until the order is sent (a new leader sends such orders untraced).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from opentelemetry import trace
from prometheus_client import Histogram

from meshserve import state as st
from meshserve import tracing
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_placement import copies as copyplan
from meshserve_placement import keys, policy
from meshserve_placement.sizes import booked_size, reported_of
from meshserve_placement.liveness import Liveness, judge
from meshserve_placement.tuning import Tuning

log = logging.getLogger("meshserve.placement")

M_QUEUE_WAIT = Histogram(
    "meshserve_placement_queue_seconds", "Time a decided load waited in its pod's load queue before its order was sent",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

GROUP = "placement"
LAST_DECISIONS = 10_000  # kept in memory for the debug endpoint; ms:decisions has them all
UNLOAD_RETRY_SECONDS = 30.0  # an unload that failed is ordered again after this long
HANDLER_TRIES = 3  # a stream entry whose handler keeps failing is dropped (logged) after this many
CONSUMER = "leader"  # one name, so a new leader inherits the old one's unacknowledged entries
QUEUED = "queued for a loading slot"

# Writes that change nothing routing depends on (queue priorities, decision traces) skip
# `State.commit`, so they neither bump ms:rev nor look like a gap to the xDS server; they are
# fenced by the lease all the same.
_FENCED_WRITE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER lease lost')
end
for _, op in ipairs(cjson.decode(ARGV[2])) do
  redis.call(unpack(op))
end
return 1
"""

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

Ops = list[list[Any]]
Changes = list[tuple[str, str]]


class Scheduler:
    def __init__(self, settings: Settings, state: st.State, tuning: Tuning | None = None):
        self.s, self.state = settings, state
        self.t = tuning or Tuning.from_env()
        self.id = f"placement-{uuid.uuid4().hex[:8]}"
        self.view = policy.ClusterView(pods={}, models={}, horizon_s=self.t.eviction_horizon_seconds)
        self.specs: dict[str, ModelSpec] = {}
        self.pods: dict[str, Pod] = {}
        self.heartbeats: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.reported: dict[str, int] = {}  # model -> the size its last load reported (sizes.py)
        self.waiting: set[str] = set()  # models with a request held by an activator
        # model -> runtime: a request waits for a pool that has no pods yet (scale from zero)
        self.pending: dict[str, str] = {}
        # model -> [since, last asked]: a waiting request's model that fits only once busy,
        # loading or unloading copies free up (policy.Decision.waits_for_room). Retried, oldest
        # first, whenever room may have freed; dropped once no activator asked for it within the
        # cold-start timeout. In memory only: the activator asks again every 2 s while a
        # request waits, so a new leader learns them again within that.
        self.room: dict[str, list[float]] = {}
        self.queues: dict[str, dict[str, float]] = {}  # pod -> model -> priority (mirror of ms:loadq:<pod>)
        self.rates: dict[str, float] = {}  # requests/s per model, from the runtimes' counters
        self.last_added: dict[str, float] = {}
        self._counts: dict[tuple[str, str], int] = {}  # (pod, model) -> last request count seen
        # Rate rounds since this leader took over: rates live in memory only, so a new leader
        # makes no scale-down decision before it has measured them (it would see 0 requests/s
        # everywhere and unload copies that are under load).
        self._rate_rounds = 0
        self.stalled: dict[str, str] = {}  # pod -> why: heartbeat stale, runtime still serving
        self.pins: set[str] = set()  # models pinned through the repository API (keys.PINS)
        self._failed_unloads: dict[tuple[str, str], float] = {}  # (model, pod) -> when last ordered
        self._lastused_seen = 0.0
        self._recent: dict[str, float] = {}  # models used within the busy window -> last use
        self._changes_id, self._changes_rev = "0-0", 0  # how far ms:changes was followed
        self._renew = state.r.register_script(_RENEW_LUA)
        self._fenced_write = state.r.register_script(_FENCED_WRITE_LUA)
        self._lock = asyncio.Lock()  # one decision at a time: the view is shared by all handlers
        self.leading = asyncio.Event()
        self.last_decisions: OrderedDict[str, policy.Decision] = OrderedDict()  # the newest, for /debug
        self._traces: dict[tuple[str, str], dict[str, str]] = {}  # (pod, model) -> the decision's trace fields, until its order is sent
        self._decided: dict[str, trace.SpanContext] = {}  # model -> its latest decision's span (joined loads link to it)

    # --- leadership -----------------------------------------------------------------
    async def run(self) -> None:
        lease_ms = int(self.s.lease_seconds * 1000)
        while True:
            try:
                if await self.state.r.set(st.LEASE, self.id, nx=True, px=lease_ms):
                    log.info("%s took the placement lease", self.id)
                    await self._lead(lease_ms)
            except st.NotLeader:
                log.warning("%s was deposed mid-write", self.id)
            except (aioredis.RedisError, OSError) as e:
                log.warning("placement: redis error: %s", e)
            self.leading.clear()
            await asyncio.sleep(self.s.lease_seconds / 3)

    async def _lead(self, lease_ms: int) -> None:
        # The lease is kept by its own task from the start: taking over 100,000 models takes
        # seconds of parsing, longer than the lease, and a leader that lost its lease while
        # reloading would reload again forever.
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(lease_ms, lost))
        try:
            await self._ensure_groups()
            self._rate_rounds, self.rates, self._counts, self.stalled = 0, {}, {}, {}
            await self._reload()
            if lost.is_set():
                return
            self.leading.set()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(1.0, self.t.rate_poll_seconds))) as http:
                tasks = [
                    asyncio.create_task(self._consume(st.LOAD_REQUESTS, self._on_load_request)),
                    asyncio.create_task(self._consume(st.EVENTS, self._on_event)),
                    asyncio.create_task(self._expire_pods(http)),
                    asyncio.create_task(self._maintain(http)),
                    asyncio.create_task(self._room_loop()),
                ]
                try:
                    while not lost.is_set():
                        await asyncio.wait([keeper, *tasks], timeout=self.s.lease_seconds / 3, return_when=asyncio.FIRST_COMPLETED)
                        for t in tasks:
                            if t.done() and t.exception():
                                raise t.exception()  # type: ignore[misc]
                        if keeper.done() and keeper.exception():
                            raise keeper.exception()  # type: ignore[misc]
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _keep_lease(self, lease_ms: int, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.s.lease_seconds / 3)
            if not await self._renew(keys=[st.LEASE], args=[self.id, lease_ms]):
                log.warning("%s lost the placement lease", self.id)
                lost.set()
                return

    async def _ensure_groups(self) -> None:
        for key in (st.LOAD_REQUESTS, st.EVENTS):
            try:
                await self.state.r.xgroup_create(key, GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def _rebuild(self) -> None:
        """Everything the previous leader decided is in Redis: rebuild the view from it."""
        r = self.state.r
        # Where to follow ms:changes from: taken before the snapshot, so a change made between
        # the two is read again (harmless), never missed.
        last = await r.xrevrange(st.CHANGES, count=1)
        self._changes_id = last[0][0].decode() if last else "0-0"
        self._changes_rev = int(last[0][1].get(b"rev", b"0")) if last else 0
        snap = await self.state.snapshot()
        self.specs = snap.models
        self.pods = dict(snap.pods)
        hb = await r.zrange(st.HEARTBEATS, 0, -1, withscores=True)
        self.heartbeats = {k.decode(): v for k, v in hb}
        lu = await r.zrange(st.LAST_USED, 0, -1, withscores=True)
        now = time.time()
        excluded = {}
        for k, v in (await r.hgetall(keys.EXCLUDED)).items():
            m, _, p = k.decode().rpartition("|")
            if float(v) > now:
                excluded[(m, p)] = float(v)
        # Building the view is pure and O(models): off the event loop, so the lease keeps.
        self.view = await asyncio.to_thread(_build_view, snap, lu, excluded, self.t.eviction_horizon_seconds)
        self._failed_unloads = {
            (m, p): time.time() for m, cs in self.view.copies.items() for p, c in cs.items()
            if c.state == CopyState.UNLOADING and c.reason.startswith("unload failed")
        }
        self.pins = {k.decode() for k in await r.hkeys(keys.PINS)}
        for m in self.pins:
            if m in self.view.models:
                self.view.models[m].pinned = True
        await self._refresh_pods()  # the declared runtimes too, before any decision on the new view
        self._lastused_seen = max((v for _, v in lu), default=0.0)
        self.queues = {}
        for pod in self.pods:
            q = await r.zrange(keys.loadq_key(pod), 0, -1, withscores=True)
            if q:
                self.queues[pod] = {k.decode(): v for k, v in q}
        self.waiting = {m for q in self.queues.values() for m, prio in q.items() if prio < keys.BACKGROUND}
        log.info("%s: state reloaded: %d models, %d pods, %d placements, %d queued loads", self.id,
                 len(self.specs), len(self.pods), len(snap.placements), sum(len(q) for q in self.queues.values()))

    async def _reload(self) -> None:
        await self._rebuild()
        async with self._lock:
            for pod in list(self.pods):
                await self._dispatch(pod)  # slots may have freed while nobody led

    async def _consume(self, key: str, handler: Any) -> None:
        cursor = "0"
        failures_seen: dict[bytes, int] = {}
        while True:
            resp = await self.state.r.xreadgroup(GROUP, CONSUMER, {key: cursor}, count=64, block=1000)
            entries = resp[0][1] if resp else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            for eid, fields in entries:
                try:
                    async with self._lock:
                        f = {k.decode(): v.decode() for k, v in fields.items()}
                        with tracing.handling(f.get("model", ""), f):
                            await handler(f)
                except st.NotLeader:
                    raise
                except Exception:
                    # The view may now differ from Redis (a handler can fail between its view
                    # change and its commit): rebuild it from Redis, and handle the entry again
                    # from the pending list instead of acknowledging it as done.
                    n = failures_seen[eid] = failures_seen.get(eid, 0) + 1
                    log.exception("placement: handling %s %s failed (try %d of %d); reloading the view", key, fields, n, HANDLER_TRIES)
                    async with self._lock:
                        await self._rebuild()
                    if n < HANDLER_TRIES:
                        cursor = "0"
                        break
                    log.error("placement: dropping %s entry %s after %d failed tries", key, eid, n)
                failures_seen.pop(eid, None)
                await self.state.r.xack(key, GROUP, eid)

    async def _commit(self, ops: Ops, changes: Changes) -> int:
        if changes:
            return await self.state.commit(ops, changes, fence=self.id)
        if ops:
            try:
                await self._fenced_write(keys=[st.LEASE], args=[self.id, json.dumps([[str(x) for x in op] for op in ops])])
            except aioredis.ResponseError as e:
                if "NOTLEADER" in str(e):
                    raise st.NotLeader(str(e)) from None
                raise
        return 0

    def _set_copies(self, model: str, copies: dict[str, Copy], ops: Ops, changes: Changes) -> None:
        if copies:
            self.view.copies[model] = copies
            ops.append(["HSET", st.PLACEMENTS, model, copies_to_json(copies)])
        else:
            self.view.copies.pop(model, None)
            ops.append(["HDEL", st.PLACEMENTS, model])
        changes.append((st.KIND_PLACEMENT, model))

    # --- decisions -------------------------------------------------------------------
    def _apply_spec(self, spec: ModelSpec) -> None:
        self.specs[spec.id] = spec
        old = self.view.models.get(spec.id)
        mv = _model_view(spec, self.reported.get(spec.id, 0))
        mv.pinned = mv.pinned or spec.id in self.pins
        if old is not None and self.view.live_copies(spec.id):
            mv.size = old.size  # keep the measured size once loaded
        self.view.models[spec.id] = mv

    async def _refresh_model_and_pods(self, model_id: str) -> ModelSpec | None:
        """The model's spec, always fresh (annotations: min/max/pinned may change), and the pods
        (`_refresh_pods`), in one Redis round trip: a cold request's decision waits for both
        (issue 19 §4: one round trip fewer on the cold path)."""
        async with self.state.r.pipeline(transaction=False) as p:
            p.hget(st.MODELS, model_id).hgetall(st.PODS).hgetall(st.RUNTIMES)
            raw_spec, raw, raw_runtimes = await p.execute()
        self._apply_pods(raw, raw_runtimes)
        if not raw_spec:
            return self.specs.get(model_id)
        spec = ModelSpec.from_json(raw_spec)
        self._apply_spec(spec)
        return spec

    async def _refresh_pods(self) -> None:
        """Pods register themselves and flag draining; pick up new pods and changed fields,
        and the declared ServingRuntimes."""
        async with self.state.r.pipeline(transaction=False) as p:
            p.hgetall(st.PODS).hgetall(st.RUNTIMES)
            raw, raw_runtimes = await p.execute()
        self._apply_pods(raw, raw_runtimes)

    def _apply_pods(self, raw: dict[bytes, bytes], raw_runtimes: dict[bytes, bytes]) -> None:
        runtimes = {n: policy.RuntimeView(n, tuple(f), tuple(a)) for n, (f, a) in st.parse_runtimes(raw_runtimes).items()}
        if runtimes != self.view.runtimes:
            self.view.runtimes = runtimes
        for k, v in raw.items():
            pid = k.decode()
            p = Pod.from_json(v)
            self.pods[pid] = p
            pv = self.view.pods.get(pid)
            if pv is None:
                self.view.pods[pid] = _pod_view(p)
                self.heartbeats.setdefault(pid, time.time())
            else:
                if (pv.runtime, pv.formats, pv.auto_formats) != (p.runtime, p.formats, p.auto_formats):
                    pv.runtime, pv.formats, pv.auto_formats = p.runtime, p.formats, p.auto_formats
                    self.view.pods_changed()
                pv.capacity, pv.max_loading, pv.draining = p.capacity_bytes, p.max_loading, p.draining

    def _mark_health(self, now: float) -> None:
        for pid, pv in self.view.pods.items():
            pv.healthy = now - self.heartbeats.get(pid, 0) <= self.s.heartbeat_seconds * self.s.heartbeat_misses

    async def _on_load_request(self, f: dict[str, str]) -> None:
        model_id = f["model"]
        op = f.get("op", "load")
        if op in ("pin", "unpin"):
            if not await self._set_pin(model_id, op == "pin") or op == "unpin":
                return
        if op in ("withdraw", "retire"):
            await self._retire(model_id, orders=op == "retire", why=f.get("why", ""))
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
        if model_id in self.room:
            self.room[model_id][1] = time.time()  # still wanted: keep it waiting
            await self._retry_room()
            return
        spec = await self._refresh_model_and_pods(model_id)
        if spec is None:
            return
        # Requests already waiting for room go first: a newcomer must not take the room they wait for.
        await self._retry_room()
        self.attempts[model_id] = 0
        self.waiting.add(model_id)
        await self._place(spec, waiting=True)

    async def _retire(self, model_id: str, orders: bool, why: str) -> None:
        """A superseded version, on the rollout controller's request (it asks; only the leader
        writes placements and orders). `withdraw`: its loaded copies become UNLOADING, which takes
        their routes away while their memory stays booked. `retire`, a little later, once the
        gateways stopped sending there: the unload orders."""
        ops: Ops = []
        changes: Changes = []
        now = time.time()
        cs = dict(self.view.copies.get(model_id, {}))
        for pod, c in list(cs.items()):
            if c.state == CopyState.LOADED:
                cs[pod] = Copy(CopyState.UNLOADING, c.size, now, why or "superseded by a new version")
            if orders and cs[pod].state == CopyState.UNLOADING:
                ops.append(["XADD", st.orders_key(pod), "*", "op", "unload", "model", model_id])
        if cs != self.view.copies.get(model_id, {}):
            self._set_copies(model_id, cs, ops, changes)
        if ops:
            log.info("%s %s: %s", "retiring" if orders else "withdrawing", model_id, why or "superseded by a new version")
            await self._commit(ops, changes)

    async def _set_pin(self, model_id: str, pinned: bool) -> bool:
        """The repository API's load (pin) and unload (unpin). A pinned model keeps at least one
        copy and is never evicted, exactly as the `meshserve.io/pinned` annotation makes it;
        dropping the pin leaves its copies to the cache's ordinary eviction. False for a model
        that is not registered."""
        spec = await self._refresh_model(model_id)
        if spec is None:
            return False
        if pinned:
            await self._commit([["HSET", keys.PINS, model_id, time.time()]], [])
            self.pins.add(model_id)
        else:
            await self._commit([["HDEL", keys.PINS, model_id]], [])
            self.pins.discard(model_id)
        mv = self.view.models.get(model_id)
        if mv is not None:
            mv.pinned = spec.pinned or model_id in self.pins
        log.info("%s %s through the repository API", model_id, "pinned" if pinned else "unpinned")
        return True

    async def _prioritise(self, model_id: str) -> None:
        self.waiting.add(model_id)
        for pod, q in self.queues.items():
            prio = q.get(model_id)
            if prio is not None and prio >= keys.BACKGROUND:
                q[model_id] = prio - keys.BACKGROUND
                await self._commit([["ZADD", keys.loadq_key(pod), q[model_id], model_id]], [])
                await self._dispatch(pod)

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
        decision = policy.place(mv, self.view, now)
        span.set_attributes({"meshserve.outcome": "placed" if decision.pod else "unplaceable", "meshserve.reason": decision.reason or ""})
        self.last_decisions[spec.id] = decision
        self.last_decisions.move_to_end(spec.id)
        if len(self.last_decisions) > LAST_DECISIONS:
            self.last_decisions.popitem(last=False)  # ms:decisions keeps every model's, for explain
        record = {**decision.to_dict(), "ts": now, "leader": self.id, "why": why or ("a request is waiting" if waiting else "")}
        ops.append(["HSET", keys.DECISIONS, spec.id, json.dumps(record, separators=(",", ":"))])
        if decision.pod is None and decision.waits_for and waiting:
            # The request stays held: placed again once a pod of that runtime registers.
            log.info("%s waits for a pod of %s: %s", spec.id, decision.waits_for, decision.reason)
            self.pending[spec.id] = decision.waits_for
            await self._commit(ops, changes)
            return False
        if decision.pod is None and self._room_frees(spec.id, decision) and waiting:
            # No 503: the room is booked by copies that free up by themselves. The request stays
            # held and the model is retried as room frees (_retry_room), up to the cold-start timeout.
            log.info("%s waits for room: %s", spec.id, decision.reason)
            self.room.setdefault(spec.id, [now, now])[1] = now
            await self._commit(ops, changes)
            return False
        if decision.pod is None:
            log.warning("cannot place %s: %s", spec.id, decision.reason)
            if waiting:
                # Tell the waiting activators: a "-" pseudo-copy carries the reason to the 503.
                copies = dict(self.view.copies.get(spec.id, {}))
                copies["-"] = Copy(CopyState.FAILED, 0, now, decision.reason)
                self._set_copies(spec.id, copies, ops, changes)
                self.waiting.discard(spec.id)
            await self._commit(ops, changes)
            return False
        pod = decision.pod
        span.set_attributes({tracing.ATTR_POD: pod, "meshserve.evict": list(decision.evict)})
        carried = dict(tracing.inject({}))  # the orders below carry this decision's context
        trace_fields = [x for kv in carried.items() for x in kv]
        for victim in decision.evict:
            vc = dict(self.view.copies[victim])
            vc[pod] = Copy(CopyState.UNLOADING, vc[pod].size, now, f"evicted to make room for {spec.id}")
            self._set_copies(victim, vc, ops, changes)
            # Unloads never wait for a slot: they free the memory the load was promised.
            ops.append(["XADD", st.orders_key(pod), "*", "op", "unload", "model", victim, *trace_fields])
        copies = {p: c for p, c in self.view.copies.get(spec.id, {}).items() if p != "-"}
        prio = now + (0.0 if waiting else keys.BACKGROUND)
        copies[pod] = Copy(CopyState.LOADING, mv.size, now, QUEUED)
        self._set_copies(spec.id, copies, ops, changes)
        self.queues.setdefault(pod, {})[spec.id] = prio
        self._traces[(pod, spec.id)] = carried
        ops.append(["ZADD", keys.loadq_key(pod), prio, spec.id])
        log.info("placing %s on %s%s%s", spec.id, pod, f" evicting {decision.evict}" if decision.evict else "", f" ({why})" if why else "")
        # The decision and, when the pod has a free slot and the room, its load order go in one
        # commit: one round trip fewer between a cold request and its load (issue 19 §4).
        await self._dispatch(pod, ops, changes)
        return True

    def _room_frees(self, model: str, d: policy.Decision) -> bool:
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
        now = time.time()
        self._mark_health(now)
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
            d = policy.place(mv, self.view, now)
            if d.pod is not None or not self._room_frees(model, d):
                del self.room[model]
                await self._place(spec, waiting=True, why=f"room freed up after {now - since:.1f}s waiting")

    async def _room_loop(self) -> None:
        # Room also frees without an event: a just-landed copy passes the policy's landed
        # grace (1 s) and becomes evictable. While requests wait, look a few times within that
        # grace rather than once a maintain period (a retry is a pure decision until it fits).
        while True:
            quick = self.view.landed_grace_s / 4
            await asyncio.sleep(min(self.t.maintain_seconds, quick) if self.room else self.t.maintain_seconds)
            async with self._lock:
                await self._retry_room()

    def _queued_loading(self, pod: str) -> list[Copy]:
        """The pod's queued loads, as booked (a queued load is a LOADING copy not sent yet).
        O(queue), never O(the pod's models): this runs on every event."""
        held = self.view.pod_models(pod)
        return [c for m in self.queues.get(pod, {}) if (c := held.get(m)) is not None and c.state == CopyState.LOADING]

    def _dispatched(self, pod: str) -> int:
        return self.view.loading(pod) - len(self._queued_loading(pod))

    async def _dispatch(self, pod: str, ops: Ops | None = None, changes: Changes | None = None) -> None:
        """Send queued loads to the pod while it has free loading slots, waiting requests first.
        `ops` and `changes` (a decision not committed yet) are committed with the orders."""
        q = self.queues.get(pod)
        if not q:
            if ops:
                await self._commit(ops, changes or [])
            return
        pv = self.view.pods.get(pod)
        slots = max(1, pv.max_loading if pv else 1) - self._dispatched(pod)
        # What the pod really holds now: loaded, being loaded, and not yet unloaded.
        queued_bytes = sum(c.size for c in self._queued_loading(pod))
        held = self.view.used(pod) - queued_bytes + self.view.unloading(pod)
        capacity = pv.capacity if pv else 0
        # Bytes still held by unloads in their grace may overlap the loads they make room for,
        # up to the tuned fraction (0: none, the pod never holds more than its capacity).
        capacity += int(capacity * self.t.unload_overlap_fraction)
        ops = list(ops or [])
        changes = list(changes or [])
        for model in sorted(q, key=lambda m: (q[m], m)):
            cs = dict(self.view.copies.get(model, {}))
            c = cs.get(pod)
            spec = self.specs.get(model)
            if c is None or c.state != CopyState.LOADING or spec is None:
                del q[model]  # withdrawn meanwhile
                self._traces.pop((pod, model), None)
                ops.append(["ZREM", keys.loadq_key(pod), model])
                continue
            if slots <= 0 or held + c.size > capacity:
                break  # in priority order: wait for a slot, or for the evictions' unloads to finish
            slots -= 1
            held += c.size
            M_QUEUE_WAIT.observe(max(0.0, time.time() - c.since))
            del q[model]
            ops.append(["ZREM", keys.loadq_key(pod), model])
            cs[pod] = Copy(CopyState.LOADING, c.size, c.since)
            self._set_copies(model, cs, ops, changes)
            carried = [x for kv in self._traces.pop((pod, model), {}).items() for x in kv]
            ops.append(["XADD", st.orders_key(pod), "*", "op", "load", "model", model, "spec", spec.to_json(), *carried])
        if ops:
            await self._commit(ops, changes)

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

    async def _expire_pods(self, http: aiohttp.ClientSession) -> None:
        period = self.s.heartbeat_seconds
        while True:
            await asyncio.sleep(period / 2)
            hb = await self.state.r.zrange(st.HEARTBEATS, 0, -1, withscores=True)
            self.heartbeats = {k.decode(): v for k, v in hb}
            now = time.time()
            stale = [p for p in self.view.pods if now - self.heartbeats.get(p, 0) > period * self.s.heartbeat_misses]
            # Probed outside the lock: a probe waits up to half a period, decisions must not.
            answers = dict(zip(stale, await asyncio.gather(*(self._probe(http, p) for p in stale)))) if stale else {}
            async with self._lock:
                await self._refresh_pods()
                now = time.time()
                for pod in list(self.view.pods):
                    if pod not in answers:
                        if self.stalled.pop(pod, None) is not None:
                            log.info("pod %s: its loader is back", pod)
                        continue
                    v = judge(now, self.heartbeats.get(pod, 0), period, self.s.heartbeat_misses, answers[pod], self.s.loader_stall_grace_seconds)
                    if v.liveness == Liveness.GONE:
                        self.stalled.pop(pod, None)
                        await self._withdraw_pod(pod, v.reason)
                    elif v.liveness == Liveness.STALLED and pod not in self.stalled:
                        log.warning("pod %s: %s", pod, v.reason)
                        self.stalled[pod] = v.reason
                await self._place_pending()

    async def _probe(self, http: aiohttp.ClientSession, pod_id: str) -> str | None:
        """None when the pod's runtime answers (its data plane is up), else why not. REST
        readiness where the runtime serves REST, else a TCP connect to its gRPC port."""
        pod = self.pods.get(pod_id)
        if pod is None:
            return "not registered"
        timeout = max(0.2, self.s.heartbeat_seconds / 2)
        try:
            if pod.rest_port:
                async with http.get(f"http://{pod.host}:{pod.rest_port}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    return None if r.status == 200 else f"readiness answered HTTP {r.status}"
            _, w = await asyncio.wait_for(asyncio.open_connection(pod.host, pod.grpc_port), timeout)
            w.close()
            return None
        except asyncio.TimeoutError:
            return f"no answer within {timeout:g}s"
        except (aiohttp.ClientError, OSError) as e:
            return str(e) or type(e).__name__

    async def _place_pending(self) -> None:
        """Requests held for a pool with no pods: place them once one of its pods is up."""
        for model, runtime in list(self.pending.items()):
            if not self.view.pool(runtime) and runtime in self.view.runtimes:
                continue
            del self.pending[model]
            spec = self.specs.get(model)
            placed = any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in self.view.copies.get(model, {}).values())
            if spec is not None and model in self.waiting and not placed:
                await self._place(spec, waiting=True, why=f"ServingRuntime {runtime} has a pod now")

    async def _withdraw_pod(self, pod: str, reason: str) -> None:
        log.warning("withdrawing pod %s and its placements: %s", pod, reason)
        record = {"last_heartbeat": self.heartbeats.get(pod, 0.0), "withdrawn_at": time.time(), "reason": reason}
        ops: Ops = [
            ["HDEL", st.PODS, pod], ["ZREM", st.HEARTBEATS, pod], ["DEL", keys.loadq_key(pod)],
            ["HSET", st.WITHDRAWN, pod, json.dumps(record, separators=(",", ":"))],
        ]
        changes: Changes = [(st.KIND_POD, pod)]
        for m in list(self.view.pod_models(pod)):
            rest = {p: c for p, c in self.view.copies[m].items() if p != pod}
            self._set_copies(m, rest, ops, changes)
        self.view.pods.pop(pod, None)
        self.pods.pop(pod, None)
        requeue = [m for m in self.queues.pop(pod, {}) if m in self.waiting]
        self._traces = {k: v for k, v in self._traces.items() if k[0] != pod}
        await self._commit(ops, changes)
        for m in requeue + [m for m in self.waiting if not self.view.copies.get(m)]:
            spec = self.specs.get(m)
            if spec is not None and not any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in self.view.copies.get(m, {}).values()):
                await self._place(spec, waiting=True, why=f"pod {pod} died before loading it")

    # --- copies: scale, minimums, idle, draining, in-flight ----------------------------
    async def _maintain(self, http: aiohttp.ClientSession) -> None:
        last_poll = 0.0
        while True:
            await asyncio.sleep(self.t.maintain_seconds)
            now = time.time()
            if now - last_poll >= self.t.rate_poll_seconds:
                await self._poll_rates(http, now - last_poll if last_poll else 0.0)
                last_poll = now
                await self._refresh_specs()
            await self._poll_lastused(now)
            async with self._lock:
                await self._reconcile_copies(now)
                await self._retry_unloads(now)

    async def _refresh_specs(self) -> None:
        """Models registered (or re-annotated) since the last look, so minCopies and pinning
        apply without a request. Follows ms:changes: the cost is the changes', not the
        registry's (100,000 models re-read every poll would starve everything else)."""
        ids, full = await self._changed_models()
        if full:
            raw = await self.state.r.hgetall(st.MODELS)
            specs = await asyncio.to_thread(lambda: [ModelSpec.from_json(v) for v in raw.values()])
        elif ids:
            order = sorted(ids)
            specs = [ModelSpec.from_json(v) for v in await self.state.r.hmget(st.MODELS, order) if v]
        else:
            return
        async with self._lock:
            for spec in specs:
                self._apply_spec(spec)

    async def _changed_models(self, batch: int = 10_000, most: int = 20_000) -> tuple[set[str], bool]:
        """Model ids named by ms:changes since the last call, or (∅, True) when that cannot be
        told: a revision gap (entries trimmed away) or more changes than are worth targeting."""
        ids: set[str] = set()
        full = False
        while True:
            entries = await self.state.r.xrange(st.CHANGES, min="(" + self._changes_id, count=batch)
            if not entries:
                return (set(), True) if full else (ids, False)
            for _, f in entries:
                rev = int(f.get(b"rev", b"0"))
                if rev > self._changes_rev + 1:
                    full = True
                self._changes_rev = max(self._changes_rev, rev)
                kind = f.get(b"kind", b"").decode()
                if kind == st.KIND_ALL:
                    full = True
                elif kind == st.KIND_MODEL and not full:
                    ids.add(f.get(b"id", b"").decode())
            self._changes_id = entries[-1][0].decode()
            if len(ids) > most:
                full, ids = True, set()

    async def _poll_rates(self, http: aiohttp.ClientSession, interval: float) -> None:
        """Request counts from every runtime: rates for scaling, counts for the eviction value."""

        async def one(pod: Pod) -> tuple[str, dict[str, Any]]:
            try:
                async with http.get(f"http://{pod.host}:{pod.rest_port}/v2/meshserve/stats") as r:
                    return pod.id, (await r.json() if r.status == 200 else {})
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return pod.id, {}

        results = await asyncio.gather(*(one(p) for p in list(self.pods.values())))
        deltas: dict[str, int] = {}
        seen: set[tuple[str, str]] = set()
        for pod, stats in results:
            for m, s in stats.items():
                n = int(s.get("requests", 0))
                key = (pod, m)
                seen.add(key)
                prev = self._counts.get(key)
                self._counts[key] = n
                d = n - prev if prev is not None and n >= prev else 0
                if d:
                    deltas[m] = deltas.get(m, 0) + d
                    if s.get("last_used"):
                        lu = float(s["last_used"])
                        self.view.touch(m, lu, uses=d)
                        self._recent[m] = max(lu, self._recent.get(m, 0.0))
        for key in [k for k in self._counts if k not in seen]:
            del self._counts[key]
        if interval > 0:
            # An EWMA over ~3 polls: fast enough to add a copy within seconds, steady enough not to
            # flap. A new leader's first round is taken as it is: it has nothing to smooth against.
            self._rate_rounds += 1
            alpha = 0.5 if self._rate_rounds > 1 else 1.0
            for m in set(self.rates) | set(deltas):
                r = alpha * deltas.get(m, 0) / interval + (1 - alpha) * self.rates.get(m, 0.0)
                if r < 0.01:
                    self.rates.pop(m, None)
                else:
                    self.rates[m] = r

    async def _poll_lastused(self, now: float) -> None:
        """Recent uses (runtime counters copied by the loaders, cold hits from the activator)."""
        since = self._lastused_seen - 2 * self.s.heartbeat_seconds
        recent = await self.state.r.zrangebyscore(st.LAST_USED, since, "+inf", withscores=True)
        for k, v in recent:
            m = k.decode()
            self.view.touch(m, v)
            self._recent[m] = max(v, self._recent.get(m, 0.0))
            self._lastused_seen = max(self._lastused_seen, v)
        # In flight: used within the window. The runtimes serve a request in well under it and
        # report each heartbeat, so a model with a request in progress is always in this set.
        window = self.t.busy_window_seconds
        self._recent = {m: t for m, t in self._recent.items() if now - t < window}
        self.view.in_flight = set(self._recent)

    async def _reconcile_copies(self, now: float) -> None:
        self._mark_health(now)
        draining = {p for p, pv in self.view.pods.items() if pv.draining}
        for a in copyplan.plan(self.view, self.rates, now, self.t, self.last_added, draining, scale_down=self._rate_rounds > 0):
            spec = self.specs.get(a.model)
            if a.op == "add" and spec is not None:
                if await self._place(spec, waiting=a.model in self.waiting, why=a.why):
                    self.last_added[a.model] = now
            elif a.op == "remove":
                await self._unload(a.model, a.pod, a.why)

    async def _retry_unloads(self, now: float) -> None:
        """Unloads a pod reported failed are ordered again, each at most every UNLOAD_RETRY_SECONDS.
        O(failed unloads), never O(models): this runs every maintain period."""
        ops: Ops = []
        changes: Changes = []
        for (model, pod), since in list(self._failed_unloads.items()):
            c = self.view.copies.get(model, {}).get(pod)
            if c is None or c.state != CopyState.UNLOADING:
                del self._failed_unloads[(model, pod)]
            elif now - since >= UNLOAD_RETRY_SECONDS:
                log.info("ordering the unload of %s on %s again: %s", model, pod, c.reason)
                self._failed_unloads[(model, pod)] = now
                ops.append(["XADD", st.orders_key(pod), "*", "op", "unload", "model", model])
        if ops:
            await self._commit(ops, changes)

    async def _unload(self, model: str, pod: str, why: str) -> None:
        cs = dict(self.view.copies.get(model, {}))
        c = cs.get(pod)
        if c is None or c.state != CopyState.LOADED:
            return
        log.info("unloading %s from %s: %s", model, pod, why)
        ops: Ops = []
        changes: Changes = []
        cs[pod] = Copy(CopyState.UNLOADING, c.size, time.time(), why)
        self._set_copies(model, cs, ops, changes)
        ops.append(["XADD", st.orders_key(pod), "*", "op", "unload", "model", model])
        await self._commit(ops, changes)


def _model_view(m: ModelSpec, reported: int = 0) -> policy.ModelView:
    # The size a load reported, else the stated size, else the unknown-size default (sizes.py).
    return policy.ModelView(m.id, m.format, booked_size(m.size_hint, reported), m.pinned, m.min_copies, m.max_copies, m.runtime)


def _pod_view(p: Pod) -> policy.PodView:
    return policy.PodView(p.id, p.capacity_bytes, p.formats, True, p.max_loading, p.draining, p.runtime, p.auto_formats)


def _build_view(snap: st.Snapshot, lastused: list[tuple[bytes, float]], excluded: dict[tuple[str, str], float], horizon_s: float) -> policy.ClusterView:
    view = policy.ClusterView(
        pods={p.id: _pod_view(p) for p in snap.pods.values()},
        # A new leader knows a model's reported size from the copies it finds booked.
        models={m.id: _model_view(m, reported_of(c.size for c in snap.placements.get(m.id, {}).values() if c.state == CopyState.LOADED)) for m in snap.models.values()},
        copies={m: cs for m, cs in snap.placements.items() if cs},
        excluded=excluded,
        horizon_s=horizon_s,
    )
    for k, v in lastused:
        view.touch(k.decode(), v)
    return view
