"""The placement leader: turns load requests and loader events into placements and orders.

Only the lease holder writes placements, and every write is fenced by the lease inside the
same Lua commit, so a deposed leader can never double-book memory. The leader keeps a
ClusterView in memory, rebuilt from Redis when it takes the lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from meshserve import state as st
from meshserve.model import Copy, CopyState, ModelSpec, copies_to_json
from meshserve.settings import Settings
from meshserve_placement import policy

log = logging.getLogger("meshserve.placement")

GROUP = "placement"
CONSUMER = "leader"  # one name, so a new leader inherits the old one's unacknowledged entries
MAX_LOAD_ATTEMPTS = 3

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class Scheduler:
    def __init__(self, settings: Settings, state: st.State):
        self.s, self.state = settings, state
        self.id = f"placement-{uuid.uuid4().hex[:8]}"
        self.view = policy.ClusterView(pods={}, models={})
        self.specs: dict[str, ModelSpec] = {}
        self.heartbeats: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self._renew = state.r.register_script(_RENEW_LUA)
        self.leading = asyncio.Event()
        self.last_decisions: dict[str, policy.Decision] = {}

    # --- leadership -----------------------------------------------------------------
    async def run(self) -> None:
        lease_ms = int(self.s.lease_seconds * 1000)
        while True:
            try:
                if await self.state.r.set(st.LEASE, self.id, nx=True, px=lease_ms):
                    log.info("%s took the placement lease", self.id)
                    await self._lead(lease_ms)
            except (aioredis.RedisError, OSError) as e:
                log.warning("placement: redis error: %s", e)
            self.leading.clear()
            await asyncio.sleep(self.s.lease_seconds / 3)

    async def _lead(self, lease_ms: int) -> None:
        await self._ensure_groups()
        await self._reload()
        self.leading.set()
        tasks = [
            asyncio.create_task(self._consume(st.LOAD_REQUESTS, self._on_load_request)),
            asyncio.create_task(self._consume(st.EVENTS, self._on_event)),
            asyncio.create_task(self._expire_pods()),
        ]
        try:
            while True:
                await asyncio.sleep(self.s.lease_seconds / 3)
                if not await self._renew(keys=[st.LEASE], args=[self.id, lease_ms]):
                    log.warning("%s lost the placement lease", self.id)
                    return
                for t in tasks:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()

    async def _ensure_groups(self) -> None:
        for key in (st.LOAD_REQUESTS, st.EVENTS):
            try:
                await self.state.r.xgroup_create(key, GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def _reload(self) -> None:
        snap = await self.state.snapshot()
        self.specs = snap.models
        self.view = policy.ClusterView(
            pods={
                p.id: policy.PodView(p.id, p.capacity_bytes, p.formats, True, p.max_loading) for p in snap.pods.values()
            },
            models={m.id: _model_view(m) for m in snap.models.values()},
            copies=snap.placements,
        )
        hb = await self.state.r.zrange(st.HEARTBEATS, 0, -1, withscores=True)
        self.heartbeats = {k.decode(): v for k, v in hb}
        lu = await self.state.r.zrange(st.LAST_USED, 0, -1, withscores=True)
        self.view.last_used = {k.decode(): v for k, v in lu}

    async def _consume(self, key: str, handler: Any) -> None:
        cursor = "0"
        while True:
            resp = await self.state.r.xreadgroup(GROUP, CONSUMER, {key: cursor}, count=64, block=1000)
            entries = resp[0][1] if resp else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            for eid, fields in entries:
                try:
                    await handler({k.decode(): v.decode() for k, v in fields.items()})
                except st.NotLeader:
                    raise
                except Exception:
                    log.exception("placement: handling %s %s failed", key, fields)
                await self.state.r.xack(key, GROUP, eid)

    async def _commit(self, ops: list[list[Any]], changes: list[tuple[str, str]]) -> int:
        return await self.state.commit(ops, changes, fence=self.id)

    # --- decisions -------------------------------------------------------------------
    async def _refresh_model(self, model_id: str) -> ModelSpec | None:
        spec = self.specs.get(model_id)
        if spec is None:
            spec = await self.state.model(model_id)
            if spec is not None:
                self.specs[model_id] = spec
                self.view.models[model_id] = _model_view(spec)
        return spec

    async def _refresh_pods(self) -> None:
        # Pods register themselves; pick up any the leader has not seen yet.
        raw = await self.state.r.hgetall(st.PODS)
        from meshserve.model import Pod

        for k, v in raw.items():
            pid = k.decode()
            if pid not in self.view.pods:
                p = Pod.from_json(v)
                self.view.pods[pid] = policy.PodView(p.id, p.capacity_bytes, p.formats, True, p.max_loading)
                self.heartbeats.setdefault(pid, time.time())

    async def _on_load_request(self, f: dict[str, str]) -> None:
        model_id = f["model"]
        copies = self.view.copies.get(model_id, {})
        if any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in copies.values()):
            return  # many requests for one cold model make one load
        spec = await self._refresh_model(model_id)
        if spec is None:
            return
        await self._refresh_pods()
        self.attempts[model_id] = 0
        await self._place(spec)

    async def _place(
        self, spec: ModelSpec, ops: list[list[Any]] | None = None, changes: list[tuple[str, str]] | None = None
    ) -> None:
        """Decide one more copy of `spec`; commit it together with any `ops` the caller has pending."""
        ops = list(ops or [])
        changes = list(changes or [])
        now = time.time()
        for pid, pv in self.view.pods.items():
            pv.healthy = now - self.heartbeats.get(pid, 0) <= self.s.heartbeat_seconds * self.s.heartbeat_misses
        mv = self.view.models[spec.id]
        decision = policy.place(mv, self.view, now)
        self.last_decisions[spec.id] = decision
        if decision.pod is None:
            log.warning("cannot place %s: %s", spec.id, decision.reason)
            copies = dict(self.view.copies.get(spec.id, {}))
            copies["-"] = Copy(CopyState.FAILED, 0, now, decision.reason)
            self.view.copies[spec.id] = copies
            ops.append(["HSET", st.PLACEMENTS, spec.id, copies_to_json(copies)])
            await self._commit(ops, changes + [(st.KIND_PLACEMENT, spec.id)])
            return
        for victim in decision.evict:
            vc = dict(self.view.copies[victim])
            vc[decision.pod] = Copy(CopyState.UNLOADING, vc[decision.pod].size, now)
            self.view.copies[victim] = vc
            ops.append(["HSET", st.PLACEMENTS, victim, copies_to_json(vc)])
            ops.append(["XADD", st.orders_key(decision.pod), "*", "op", "unload", "model", victim])
            changes.append((st.KIND_PLACEMENT, victim))
        copies = {p: c for p, c in self.view.copies.get(spec.id, {}).items() if p != "-"}
        copies[decision.pod] = Copy(CopyState.LOADING, mv.size, now)
        self.view.copies[spec.id] = copies
        ops.append(["HSET", st.PLACEMENTS, spec.id, copies_to_json(copies)])
        ops.append(["XADD", st.orders_key(decision.pod), "*", "op", "load", "model", spec.id, "spec", spec.to_json()])
        changes.append((st.KIND_PLACEMENT, spec.id))
        await self._commit(ops, changes)
        log.info("placing %s on %s%s", spec.id, decision.pod, f" evicting {decision.evict}" if decision.evict else "")

    async def _on_event(self, f: dict[str, str]) -> None:
        if f.get("op") == "register":
            await self._reconcile_pod(f["pod"], set(json.loads(f.get("models") or "[]")))
            return
        model_id, pod, op, ok = f["model"], f["pod"], f["op"], f.get("ok") == "1"
        now = time.time()
        copies = dict(self.view.copies.get(model_id, {}))
        if op == "load":
            if pod not in copies:
                return  # the copy was withdrawn meanwhile (pod expired)
            if ok:
                size = int(f.get("size") or 0) or copies[pod].size
                copies[pod] = Copy(CopyState.LOADED, size, now)
                self.view.last_used.setdefault(model_id, now)
            else:
                copies[pod] = Copy(CopyState.FAILED, 0, now, f.get("reason", ""))
                self.view.excluded[(model_id, pod)] = now + self.s.failed_pod_exclusion_seconds
        elif op == "unload":
            copies.pop(pod, None)
        self.view.copies[model_id] = copies
        ops = [["HSET", st.PLACEMENTS, model_id, copies_to_json(copies)] if copies else ["HDEL", st.PLACEMENTS, model_id]]
        changes = [(st.KIND_PLACEMENT, model_id)]
        if op == "load" and not ok:
            n = self.attempts.get(model_id, 0) + 1
            self.attempts[model_id] = n
            spec = self.specs.get(model_id)
            if spec is not None and n < MAX_LOAD_ATTEMPTS:
                # The failure and the retry land in one commit, so nobody sees "failed, nothing pending".
                log.info("retrying load of %s elsewhere (attempt %d): %s", model_id, n + 1, f.get("reason"))
                await self._place(spec, ops, changes)
                return
        await self._commit(ops, changes)

    async def _reconcile_pod(self, pod: str, held: set[str]) -> None:
        """A (re)started pod says what its runtime really holds; copies it lost are dropped."""
        await self._refresh_pods()
        ops: list[list[Any]] = []
        changes: list[tuple[str, str]] = []
        for m, copies in list(self.view.copies.items()):
            c = copies.get(pod)
            if c is not None and c.state in (CopyState.LOADED, CopyState.LOADING, CopyState.UNLOADING) and m not in held:
                rest = {p: x for p, x in copies.items() if p != pod}
                self.view.copies[m] = rest
                ops.append(["HSET", st.PLACEMENTS, m, copies_to_json(rest)] if rest else ["HDEL", st.PLACEMENTS, m])
                changes.append((st.KIND_PLACEMENT, m))
        if ops:
            log.info("pod %s restarted without %d models; dropping those copies", pod, len(changes))
            await self._commit(ops, changes)

    async def _expire_pods(self) -> None:
        period = self.s.heartbeat_seconds
        while True:
            await asyncio.sleep(period / 2)
            hb = await self.state.r.zrange(st.HEARTBEATS, 0, -1, withscores=True)
            self.heartbeats = {k.decode(): v for k, v in hb}
            await self._refresh_pods()
            now = time.time()
            dead = [p for p in self.view.pods if now - self.heartbeats.get(p, 0) > period * self.s.heartbeat_misses]
            for pod in dead:
                await self._withdraw_pod(pod)

    async def _withdraw_pod(self, pod: str) -> None:
        log.warning("pod %s missed its heartbeats: withdrawing its placements", pod)
        ops: list[list[Any]] = [["HDEL", st.PODS, pod], ["ZREM", st.HEARTBEATS, pod]]
        changes: list[tuple[str, str]] = [(st.KIND_POD, pod)]
        for m, copies in list(self.view.copies.items()):
            if pod in copies:
                rest = {p: c for p, c in copies.items() if p != pod}
                self.view.copies[m] = rest
                ops.append(["HSET", st.PLACEMENTS, m, copies_to_json(rest)] if rest else ["HDEL", st.PLACEMENTS, m])
                changes.append((st.KIND_PLACEMENT, m))
        self.view.pods.pop(pod, None)
        await self._commit(ops, changes)


def _model_view(m: ModelSpec) -> policy.ModelView:
    return policy.ModelView(m.id, m.format, m.size_hint or 64 << 20, m.pinned, m.min_copies, m.max_copies)
