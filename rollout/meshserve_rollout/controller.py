"""The rollout controller: InferenceService version moves and progressive canaries.

Runs as its own process (`python -m meshserve_rollout`, started by `meshserve up`); one
instance leads at a time through a Redis lease. Every decision is a pure function of
(transition or rule status, placements, time, error rates), so tests drive it without Redis.

Version move (docs/design/traffic.md):
  Loading   new concrete model requested from placement (ms:loadreq, as the activator does)
            until it has as many loaded copies as the old one; traffic stays on the old one.
            A failed load ends in TRANSITION_FAILED with the reason, traffic untouched.
  Canary    (canaryTrafficPercent < 100) the alias is split old/new, old stays "last ready".
  Draining  the alias points at the new model; the old one keeps serving in-flight requests.
  Unloading the old model's routes are withdrawn (copies marked unloading) ...
  Done      ... and, a moment later, unload orders go to its pods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store import messages
from meshserve.store.state import NotLeader, Snapshot, State
from meshserve.store.lease import Lease
from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.rules import plan as pl
from meshserve.rules import store
from meshserve.rules.moves import restore_spec_ops
from meshserve.rules.schema import parse_duration, referenced_models
from meshserve.settings import Settings

log = logging.getLogger("meshserve.rollout")

T_UNLOADING = "Unloading"
TICK_S = 0.2
# > xDS debounce (200 ms) + Envoy apply, the time a typical request takes, and placement's
# spec refresh (2 s poll), so it has seen the old version's minCopies go before it unloads.
DRAIN_S = 4.0
ROUTE_WITHDRAW_S = 1.0  # between withdrawing the old model's routes and unloading it
PARTIAL_COPIES_AFTER_S = 10.0  # placement gave fewer copies than asked and loads nothing more
LOAD_REREQUEST_S = 2.0
DEFAULT_ABORT_WINDOW_S = 60.0
DEFAULT_ABORT_MIN_REQUESTS = 10


def _counts(copies: dict[str, Copy], since: float) -> tuple[int, int, list[str]]:
    loaded = sum(1 for c in copies.values() if c.state == CopyState.LOADED)
    loading = sum(1 for c in copies.values() if c.state == CopyState.LOADING)
    failed = [c.reason or "load failed" for c in copies.values() if c.state == CopyState.FAILED and c.since >= since]
    return loaded, loading, failed


# --- pure decisions -------------------------------------------------------------------------


@dataclass
class TransitionAction:
    """What the controller should do for one transition now."""

    transition: pl.Transition | None = None  # new value to store, if changed
    move_alias: bool = False
    request_load: bool = False
    withdraw_old: bool = False
    unload_old: bool = False
    restore_spec: bool = False  # give the new model back the user's own minCopies


def step_transition(t: pl.Transition, new_copies: dict[str, Copy], old_copies: dict[str, Copy], now: float,
                    last_request: float, load_timeout_s: float, old_in_use: bool) -> TransitionAction:
    out = _step_transition(t, new_copies, old_copies, now, last_request, load_timeout_s, old_in_use)
    if out.transition is not None and out.transition.phase in (pl.T_DRAINING, pl.T_FAILED) and "minCopies" in t.extra:
        out.restore_spec = True
    return out


def _step_transition(t: pl.Transition, new_copies: dict[str, Copy], old_copies: dict[str, Copy], now: float,
                     last_request: float, load_timeout_s: float, old_in_use: bool) -> TransitionAction:
    out = TransitionAction()
    if t.phase == pl.T_LOADING:
        loaded, loading, failed = _counts(new_copies, t.since)
        if loaded >= t.copies or (loaded and not loading and now - t.extra.get("firstLoaded", now) > PARTIAL_COPIES_AFTER_S):
            nt = pl.Transition(**{**t.__dict__, "extra": {**t.extra, "loadedAtMove": loaded}})
            if loaded < t.copies:
                nt.reason = f"placement gave {loaded} of {t.copies} copies; moving with {loaded}"
            if t.percent is None or t.percent >= 100:
                nt.phase, nt.since, out.move_alias = pl.T_DRAINING, now, True
            else:
                nt.phase, nt.since = pl.T_CANARY, now
            out.transition = nt
        elif failed and not loading and not loaded:
            out.transition = pl.Transition(**{**t.__dict__, "phase": pl.T_FAILED, "reason": failed[-1], "since": now})
        elif now - t.since > load_timeout_s:
            why = f"{t.new} was not loaded within {load_timeout_s:g}s" + (f" ({loaded} of {t.copies} copies)" if loaded else "")
            out.transition = pl.Transition(**{**t.__dict__, "phase": pl.T_FAILED, "reason": why, "since": now})
        else:
            if loaded and "firstLoaded" not in t.extra:
                out.transition = pl.Transition(**{**t.__dict__, "extra": {**t.extra, "firstLoaded": now}})
            # Ask for one more copy while placement is not busy with one (it places one per request).
            out.request_load = not loading and not failed and now - last_request > LOAD_REREQUEST_S
    elif t.phase == pl.T_CANARY:
        if t.percent is None or t.percent >= 100:
            out.transition = pl.Transition(**{**t.__dict__, "phase": pl.T_DRAINING, "since": now})
            out.move_alias = True
    elif t.phase == pl.T_DRAINING and now - t.since >= DRAIN_S:
        if old_in_use:  # a rule or another name still sends traffic to it: keep it
            out.transition = pl.Transition(**{**t.__dict__, "phase": pl.T_DONE, "since": now, "reason": f"{t.old} kept: still in use"})
        else:
            out.transition = pl.Transition(**{**t.__dict__, "phase": T_UNLOADING, "since": now})
            out.withdraw_old = True
    elif t.phase == T_UNLOADING and now - t.since >= ROUTE_WITHDRAW_S:
        out.transition = pl.Transition(**{**t.__dict__, "phase": pl.T_DONE, "since": now})
        out.unload_old = True
    return out


def step_canary(spec: dict[str, Any], status: dict[str, Any], now: float, error_rate: tuple[float, int] | None,
                load_failure: str = "") -> dict[str, Any] | None:
    """The next status of a progressive-canary rule, or None when unchanged.
    `error_rate`: (percent of failed requests, requests) of the canary over the abort window.
    `load_failure`: why the canary cannot be loaded, if it cannot (its requests would all fail)."""
    phase = status.get("phase")
    if phase not in (pl.PROGRESSING, pl.PAUSED):
        return None
    c = spec["canary"]
    abort = c.get("abort")
    if load_failure and pl.canary_weight(spec, status) > 0:
        return {**status, "phase": pl.ABORTED, "since": now, "reason": f"canary could not be loaded: {load_failure}"}
    if abort and error_rate is not None and pl.canary_weight(spec, status) > 0:
        rate, n = error_rate
        if n >= abort.get("minRequests", DEFAULT_ABORT_MIN_REQUESTS) and rate > abort["errorRatePercent"]:
            return {**status, "phase": pl.ABORTED, "since": now,
                    "reason": f"canary error rate {rate:.1f}% over {n} requests crossed {abort['errorRatePercent']}%"}
    if phase == pl.PROGRESSING:
        hold = parse_duration(c["steps"][int(status.get("step", 0))]["hold"])
        if now - float(status.get("since", now)) >= hold:
            return advance(spec, status, now)
    return None


def advance(spec: dict[str, Any], status: dict[str, Any], now: float) -> dict[str, Any]:
    steps = spec["canary"]["steps"]
    i = int(status.get("step", 0)) + 1
    if i >= len(steps):
        return {**status, "phase": pl.PROMOTED, "step": len(steps) - 1, "since": now, "reason": ""}
    return {**status, "phase": pl.PROGRESSING if "hold" in steps[i] else pl.PAUSED, "step": i, "since": now, "reason": ""}


def parse_runtime_metrics(text: str) -> dict[str, tuple[float, float]]:
    """model -> (requests, failed requests) from a runtime's /metrics.

    Failed: any 4xx or 5xx except 404 (the model not on that pod: routing's business) and 429
    (overload). A 4xx counts because a canary refusing requests its stable version accepts
    (a changed input schema) is exactly the regression a canary is for."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "meshserve_runtime_requests":
            continue
        for s in fam.samples:
            if not s.name.endswith("_total"):
                continue
            m = s.labels.get("model", "")
            total, bad = out.get(m, (0.0, 0.0))
            code = s.labels.get("code", "")
            failed = code[:1] in ("4", "5") and code not in ("404", "429")
            out[m] = (total + s.value, bad + (s.value if failed else 0.0))
    return out


@dataclass
class ErrorWindow:
    """Per-model request/error counters sampled over time, for rates over a window."""

    samples: dict[str, deque[tuple[float, float, float]]] = field(default_factory=dict)

    def add(self, now: float, counts: dict[str, tuple[float, float]]) -> None:
        for m, (total, bad) in counts.items():
            q = self.samples.setdefault(m, deque(maxlen=4096))
            q.append((now, total, bad))

    def rate(self, model: str, window_s: float, now: float) -> tuple[float, int] | None:
        q = self.samples.get(model)
        if not q or len(q) < 2:
            return None
        newest = q[-1]
        oldest = next((s for s in q if s[0] >= now - window_s), q[0])
        n = newest[1] - oldest[1]
        if n <= 0:
            return (0.0, 0)
        return (100.0 * (newest[2] - oldest[2]) / n, int(n))


# --- I/O ---------------------------------------------------------------------------------------


class Controller:
    def __init__(self, settings: Settings, state: State):
        self.s, self.state = settings, state
        self.id = f"rollout-{uuid.uuid4().hex[:8]}"
        # Every write is fenced by the lease: one that outlived its holder's lease fails whole.
        self._fence = {"fence": self.id, "lease": keys.ROLLOUT_LEASE}
        self.last_request: dict[str, float] = {}
        self.errors = ErrorWindow()

    async def run(self) -> None:
        lease = Lease(self.state.r, keys.ROLLOUT_LEASE, self.id, 3.0)
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    if await lease.hold():
                        await self.tick(http, time.time())
                except NotLeader:
                    log.info("%s lost the rollout lease mid-tick; its write was refused", self.id)
                except Exception as e:  # redis gone or a bad record: keep going, say why
                    log.warning("rollout: %s: %s", type(e).__name__, e)
                await asyncio.sleep(TICK_S)

    async def view(self, names: set[str], transitions: dict[str, pl.Transition]) -> Snapshot:
        """Just the part of the state the rules and moves touch: a few HMGETs, not the whole
        registry, so ticking several times a second stays cheap at 100,000 models."""
        names = set(names)
        ids = {x for t in transitions.values() for x in (t.old, t.new)}
        async with self.state.r.pipeline(transaction=True) as p:
            p.get(keys.REV).hgetall(keys.PODS)
            if names:
                p.hmget(keys.ALIASES, sorted(names))
            rev, pods_raw, *rest = await p.execute()
        from meshserve.model import Pod, copies_from_json

        aliases = {n: v.decode() for n, v in zip(sorted(names), rest[0] if rest else []) if v}
        ids |= set(aliases.values()) | (names - set(aliases))
        id_list = sorted(ids)
        async with self.state.r.pipeline(transaction=True) as p:
            if id_list:
                p.hmget(keys.MODELS, id_list).hmget(keys.PLACEMENTS, id_list)
            got = await p.execute() if id_list else [[], []]
        models = {i for i, raw in zip(id_list, got[0]) if raw}
        return Snapshot(
            rev=int(rev or 0),
            models={i: None for i in models},  # type: ignore[misc]  (only membership is used here)
            aliases=aliases,
            pods={k.decode(): Pod.from_json(v) for k, v in pods_raw.items()},
            placements={i: copies_from_json(raw) for i, raw in zip(id_list, got[1]) if raw},
        )

    async def tick(self, http: aiohttp.ClientSession | None, now: float) -> None:
        rules, statuses, transitions = await store.read_all(self.state)
        moving = {a: t for a, t in transitions.items() if t.phase in (pl.T_LOADING, pl.T_CANARY, pl.T_DRAINING, T_UNLOADING)}
        if not rules and not moving:
            return  # nothing to watch: one small read per tick
        names = {n for spec in rules.values() for n in referenced_models(spec)} | set(transitions)
        snap = await self.view(names, moving)
        plans = pl.build_plans(rules, statuses, transitions, snap.aliases, set(snap.models))
        in_use = {m for p in plans.values() for m in p.models()} | set(snap.aliases.values())
        for t in moving.values():
            await self._transition(t, snap, now, in_use)
        canaries = {n: s for n, s in rules.items() if s.get("canary") and statuses.get(n, {}).get("phase") in (pl.PROGRESSING, pl.PAUSED)}
        if http is not None and any(s["canary"].get("abort") for s in canaries.values()):
            await self._scrape(http, snap, now)
        for name, spec in canaries.items():
            status = statuses.get(name, {})
            canary_id = snap.aliases.get(spec["canary"]["model"], spec["canary"]["model"])
            window = parse_duration(spec["canary"]["abort"]["window"]) if spec["canary"].get("abort", {}).get("window") else DEFAULT_ABORT_WINDOW_S
            since = float(status.get("since", now))
            rate = self.errors.rate(canary_id, min(window, max(0.0, now - since) + 1.0), now)
            loaded, loading, failed = _counts(snap.placements.get(canary_id, {}), since)
            new = step_canary(spec, status, now, rate, failed[-1] if failed and not loaded and not loading else "")
            if new is not None:
                log.info("rule %s: %s step %s %s", name, new["phase"], new.get("step"), new.get("reason", ""))
                await store.set_status(self.state, name, new, **self._fence)
        # Preload what plans send traffic to, so a canary's first requests do not pay a cold start.
        for m in sorted({m for p in plans.values() for m in p.models()}):
            copies = snap.placements.get(m, {})
            if not any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in copies.values()):
                await self._request_load(m, now)

    async def _scrape(self, http: aiohttp.ClientSession, snap: Snapshot, now: float) -> None:
        totals: dict[str, tuple[float, float]] = {}
        for pod in snap.pods.values():
            try:
                async with http.get(f"http://{pod.host}:{pod.rest_port}/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    counts = parse_runtime_metrics(await r.text())
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                continue  # a pod that does not answer contributes nothing this round
            for m, (n, bad) in counts.items():
                t0, b0 = totals.get(m, (0.0, 0.0))
                totals[m] = (t0 + n, b0 + bad)
        self.errors.add(now, totals)

    async def _request_load(self, model: str, now: float) -> None:
        if now - self.last_request.get(model, 0.0) < LOAD_REREQUEST_S:
            return
        self.last_request[model] = now
        await store_ops.request_load(self.state.r, messages.LoadRequest(model, ts=now))

    async def _transition(self, t: pl.Transition, snap: Snapshot, now: float, in_use: set[str]) -> None:
        new_c, old_c = snap.placements.get(t.new, {}), snap.placements.get(t.old, {})
        step = step_transition(t, new_c, old_c, now, self.last_request.get(t.new, 0.0), self.s.load_timeout_seconds, t.old in in_use)
        if step.request_load:
            self.last_request[t.new] = 0.0
            await self._request_load(t.new, now)
        ops: list[list[Any]] = []
        changes: list[tuple[str, str]] = []
        if step.move_alias:
            ops.append(store_ops.set_alias(t.alias, t.new))
            changes.append((messages.KIND_ALIAS, t.alias))
            # minCopies and pinning belong to the InferenceService, which is the new version now:
            # the superseded one must not be kept (or reloaded) by placement for their sake.
            raw_old = await self.state.r.hget(keys.MODELS, t.old)
            if raw_old:
                old_spec = ModelSpec.from_json(raw_old)
                if old_spec.min_copies or old_spec.pinned:
                    ops.append(store_ops.set_model(dataclasses.replace(old_spec, min_copies=0, pinned=False)))
                    changes.append((messages.KIND_MODEL, t.old))
        # Placements and orders are the placement leader's to write: the controller asks it,
        # through its request stream, in the same commit as the transition (nothing is lost if
        # this process dies in between). Route first, model second (as Seldon does).
        if step.withdraw_old:
            ops.append(store_ops.request(messages.LoadRequest(t.old, "withdraw", now, f"superseded by {t.new}")))
        if step.unload_old:
            ops.append(store_ops.request(messages.LoadRequest(t.old, "retire", now, f"superseded by {t.new}")))
        if step.restore_spec:
            ops += restore_spec_ops(await self.state.r.hget(keys.MODELS, t.new), t)
            changes.append((messages.KIND_MODEL, t.new))
        if step.transition is not None:
            if step.transition.phase != t.phase:
                log.info("version move %s: %s -> %s %s", t.alias, t.phase, step.transition.phase, step.transition.reason)
            await store.set_transition(self.state, step.transition, ops, changes, **self._fence)
