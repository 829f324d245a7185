"""Kind: stateful property test (hypothesis RuleBasedStateMachine) of the placement leader's
handlers, driven directly (no stream loops, no timers).

`test_leader_keeps_its_invariants` is pure: its store is an in-memory fake of the Redis
commands and Lua scripts the leader uses (tests/placement_fakes.py). The Valkey variant runs
the same machine against a real Valkey, fewer examples.

Models include a base in two versions and two adapters over it (issue 17). Random loads, failed
loads, unloads that succeed or fail, scale-downs, pod deaths, re-registrations (with what the
runtime still holds, or nothing after a restart), leader failovers, commits that fail, and the
base rolled from one version to the other and back (the alias moved, the old version withdrawn
and retired as the rollout controller asks, the copy reconcile moving the adapters). The fake
runtimes share a base as the built-in one does: an adapter loads over the base its order names
(resolved when it loads), and a base's weights stay while an adapter loaded over them is there.
After every step:
- no pod's booked bytes (LOADED + LOADING) exceed its capacity, in the view and in the store;
- no pod really holds more than its capacity (what its runtime holds plus the loads ordered),
  nor more than placement books on it (booked copies and unloads not yet confirmed);
- a base is resident (booked: LOADED, LOADING, or kept for its adapters) on every pod where one
  of its adapters is booked, for the version that adapter copy is over, and an adapter's load
  order reaches a pod only once that base has loaded there;
- no model is double-booked on a pod: never two load orders outstanding for one (model, pod),
  never a load order for a model the pod holds already;
- the leader's view (copies, exclusions, sizes, per-pod index, load queues) equals a fresh
  reload from the store;
and a commit that fails leaves the view exactly as it was.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as hs
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from meshserve_testing import devmesh
from meshserve.model import CopyState, ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_ALIAS, KIND_MODEL, KIND_POD, LoadRequest, LoadResult, PodRegistered, UnloadResult
from meshserve_placement.view import booked as is_booked
from meshserve_placement.leader import Scheduler
from meshserve_placement.tuning import Tuning
from tests.placement_fakes import FakeRedis

MB = 1 << 20
PODS = {"p0": 100 * MB, "p1": 100 * MB, "p2": 60 * MB}
MODELS = {f"m{i}": (20 + 10 * (i % 4)) * MB for i in range(8)}  # 20..50 MB
# A base in two versions (InferenceService "b"; b__v2 registered, the alias on b__v1) and two
# adapters over it (issue 17), naming it "b": the adapters' sizes are their own bytes.
BASE, BASE2, ADAPTERS = "b__v1", "b__v2", {"a0": 5 * MB, "a1": 8 * MB}
MODELS |= {BASE: 40 * MB, BASE2: 40 * MB, **ADAPTERS}
MODEL = hs.sampled_from(sorted(MODELS))
POD = hs.sampled_from(sorted(PODS))


def _pod(pid: str) -> Pod:
    return Pod(pid, "127.0.0.1", 1, 2, PODS[pid], ["sklearn"], max_loading=1 + (pid == "p1"))


class LeaderMachine(RuleBasedStateMachine):
    redis_url = ""  # set for the Valkey variant; "" is the in-memory fake

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.r: Any = aioredis.from_url(self.redis_url) if self.redis_url else FakeRedis()
        self.state = State(self.r)
        self.holds: dict[str, dict[str, int]] = {p: {} for p in PODS}  # what each runtime really holds
        self.over: dict[str, dict[str, str]] = {p: {} for p in PODS}  # adapter -> the base it is over, per runtime
        self.order_base: dict[tuple[str, str], str] = {}  # (pod, adapter) -> the base its load order names
        self.inbox: list[tuple[str, str, str]] = []  # (pod, op, model): orders not carried out yet
        self.cursor = {p: "0-0" for p in PODS}
        self.dead: set[str] = set()
        self.run(self._setup())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.r.aclose())
        self.loop.close()

    async def _setup(self) -> None:
        await self.r.flushdb()
        await self.r.zadd(k.HEARTBEATS, {p: time.time() + 3600 for p in PODS})
        await self.state.commit([ops.set_pod(_pod(p)) for p in PODS], [(KIND_POD, p) for p in PODS])
        await self.state.register_models([ModelSpec(id=m, alias="b" if m == BASE else m, format="sklearn", size_hint=n, storage={"path": "x"},
                                                    base="b" if m in ADAPTERS else "") for m, n in MODELS.items() if m != BASE2])
        v2 = ModelSpec(id=BASE2, alias="b", format="sklearn", size_hint=MODELS[BASE2], storage={"path": "y"})
        await self.state.commit([["HSET", k.MODELS, BASE2, v2.to_json()]], [(KIND_MODEL, BASE2)])  # the alias stays on v1
        await self._new_leader()

    async def _new_leader(self) -> None:
        s = Settings(redis_url="redis://unused", heartbeat_seconds=1.0, lease_seconds=5.0)
        self.leader = Scheduler(s, self.state, Tuning(busy_window_seconds=0.0))
        await self.r.set(k.LEASE, self.leader.id)  # the old leader, if any, is deposed: its commits fail
        await self.leader._reload()

    async def _handle(self, coro_fn: Any) -> None:
        async with self.leader._deciding():
            await coro_fn()
        await self._read_orders()

    async def _read_orders(self) -> None:
        for p in PODS:
            for eid, f in await self.r.xrange(k.orders_key(p), min="(" + self.cursor[p]):
                self.cursor[p] = eid.decode()
                if p not in self.dead:
                    self.inbox.append((p, f[b"op"].decode(), f[b"model"].decode()))
                    if f.get(b"spec") and (base := ModelSpec.from_json(f[b"spec"]).base):
                        self.order_base[(p, f[b"model"].decode())] = base

    def memory(self, pod: str) -> int:
        """What the pod's runtime holds: its models, and the bases adapters still use."""
        held = self.holds[pod]
        return sum(held.values()) + sum(MODELS[b] for b in set(self.over[pod].values()) if b not in held)

    def _unloaded(self, pod: str, model: str) -> None:
        self.holds[pod].pop(model, None)
        self.over[pod].pop(model, None)

    # --- rules ------------------------------------------------------------------------------
    @rule(model=MODEL)
    def request_load(self, model: str) -> None:
        self.run(self._handle(lambda: self.leader._on_load_request(LoadRequest(model).encode())))

    @precondition(lambda self: any(op == "load" for _, op, _ in self.inbox))
    @rule(data=hs.data(), ok=hs.booleans())
    def load_result(self, data: Any, ok: bool) -> None:
        pod, op, model = data.draw(hs.sampled_from([o for o in self.inbox if o[1] == "load"]))
        self.inbox.remove((pod, op, model))
        size = MODELS[model]
        if model in ADAPTERS:  # over the base its order names, resolved now (as the loader does)
            base = self.run(self.state.resolve(self.order_base.pop((pod, model))))
            # Its order was sent only once that base had loaded there.
            assert base in self.holds[pod], (pod, model, base, self.holds[pod])
            if ok:
                self.over[pod][model] = base
        if ok:
            self.holds[pod][model] = size
        ev = LoadResult(pod, model, ok, size if ok else 0, "" if ok else "the runtime refused it")
        self.run(self._handle(lambda: self.leader._on_event(ev.encode())))

    @precondition(lambda self: any(op == "unload" for _, op, _ in self.inbox))
    @rule(data=hs.data(), ok=hs.booleans())
    def unload_result(self, data: Any, ok: bool) -> None:
        pod, op, model = data.draw(hs.sampled_from([o for o in self.inbox if o[1] == "unload"]))
        self.inbox.remove((pod, op, model))
        if ok:
            self._unloaded(pod, model)
        ev = UnloadResult(pod, model, ok, 0, "" if ok else "the runtime refused the unload")
        self.run(self._handle(lambda: self.leader._on_event(ev.encode())))

    @rule(data=hs.data())
    def scale_down(self, data: Any) -> None:
        loaded = [(m, p) for m, cs in self.leader.view.copies.items() for p, c in cs.items() if c.state == CopyState.LOADED]
        if loaded:
            m, p = data.draw(hs.sampled_from(sorted(loaded)))
            self.run(self._handle(lambda: self.leader._unload(m, p, "test: scale down")))

    @precondition(lambda self: len(self.dead) < len(PODS) - 1)
    @rule(pod=POD)
    def pod_dies(self, pod: str) -> None:
        if pod in self.dead:
            return
        self.dead.add(pod)
        self.inbox = [o for o in self.inbox if o[0] != pod]  # its loader is gone with its orders
        self.run(self._handle(lambda: self.leader._withdraw_pod(pod, "test: heartbeat expired")))

    @precondition(lambda self: bool(self.dead))
    @rule(data=hs.data(), restarted=hs.booleans())
    def pod_registers_again(self, data: Any, restarted: bool) -> None:
        pod = data.draw(hs.sampled_from(sorted(self.dead)))
        self.dead.discard(pod)
        if restarted:
            self.holds[pod], self.over[pod] = {}, {}  # a new runtime holds nothing; a paused loader's runtime kept its models

        async def back() -> None:
            await self.r.zadd(k.HEARTBEATS, {pod: time.time() + 3600})
            await self.state.commit([ops.set_pod(_pod(pod))], [(KIND_POD, pod)])
            await self._handle(lambda: self.leader._on_event(PodRegistered(pod, dict(self.holds[pod])).encode()))

        self.run(back())

    @rule(follow=hs.booleans())
    def base_rolls(self, follow: bool) -> None:
        """The rollout moves "b" to its other version and, after the drain, asks placement to
        withdraw the old one; `follow`: the leader's spec refresh saw the alias move first."""
        async def roll() -> None:
            old = (await self.r.hget(k.ALIASES, "b")).decode()
            await self.state.commit([ops.set_alias("b", BASE2 if old == BASE else BASE)], [(KIND_ALIAS, "b")])
            if follow:
                await self.leader._refresh_specs()
                await self._read_orders()
            await self._handle(lambda: self.leader._on_load_request(LoadRequest(old, "withdraw").encode()))

        self.run(roll())

    @rule()
    def old_base_retired(self) -> None:
        """The rollout's `retire` of the version "b" does not point at (its unload orders)."""
        old = BASE2 if self.run(self.r.hget(k.ALIASES, "b")) == BASE.encode() else BASE
        self.run(self._handle(lambda: self.leader._on_load_request(LoadRequest(old, "retire").encode())))

    @rule()
    def copies_reconciled(self) -> None:
        """A maintain round: the copy reconcile (adapters moved off a superseded base) and kept
        bases whose adapters left."""
        async def go() -> None:
            await self.leader._reconcile_copies(time.time())
            await self.leader._release_held()

        self.run(self._handle(go))

    @rule()
    def leader_fails_over(self) -> None:
        self.run(self._new_leader())
        self.run(self._read_orders())

    @precondition(lambda self: isinstance(self.r, FakeRedis))  # failures are injected into the fake
    @rule(model=MODEL)
    def commit_fails(self, model: str) -> None:
        """A load request whose commit does not reach the store leaves the view as it was."""
        before = _view_state(self.leader)
        self.r.fail_next = True
        try:
            self.run(self._handle(lambda: self.leader._on_load_request(LoadRequest(model).encode())))
        except Exception:
            assert _view_state(self.leader) == before
            self.run(self.leader._rebuild())  # what the consume loop does before handling it again
        finally:
            self.r.fail_next = False

    # --- invariants ---------------------------------------------------------------------------
    @invariant()
    def booked_bytes_fit(self) -> None:
        view = self.leader.view
        for p in view.pods:
            assert view.used(p) <= PODS[p], (p, view.used(p))
        stored = self.run(self.state.snapshot()).placements
        for p in PODS:
            booked = sum(c.size for cs in stored.values() for q, c in cs.items() if q == p and c.state in (CopyState.LOADED, CopyState.LOADING))
            assert booked <= PODS[p], (p, booked)

    @invariant()
    def real_memory_fits(self) -> None:
        view = self.leader.view
        for p in PODS:
            ordered = sum(MODELS[m] for q, op, m in self.inbox if q == p and op == "load")
            assert self.memory(p) + ordered <= PODS[p], (p, self.holds[p], self.over[p], self.inbox)
            if p not in self.dead:  # what the runtime holds is booked (a dead pod's copies are dropped)
                assert self.memory(p) <= view.used(p) + view.unloading(p), (p, self.holds[p], self.over[p], dict(view.pod_models(p)))

    @invariant()
    def never_double_booked(self) -> None:
        loads = [(p, m) for p, op, m in self.inbox if op == "load"]
        assert len(loads) == len(set(loads)), loads
        for p, m in loads:
            assert m not in self.holds[p], (p, m, self.holds[p])

    @invariant()
    def a_base_is_resident_wherever_its_adapters_are(self) -> None:
        booked = (CopyState.LOADED, CopyState.LOADING)
        stored = self.run(self.state.snapshot()).placements
        view = self.leader.view
        for copies in (view.copies, stored):
            for a in ADAPTERS:
                for p, c in copies.get(a, {}).items():
                    if c.state in booked:
                        base = view.copy_base(a, p)  # the version this copy is (to be) loaded over
                        bc = copies.get(base, {}).get(p)
                        assert bc is not None and is_booked(bc), (a, p, c, base, bc)

    @invariant()
    def view_equals_a_fresh_reload(self) -> None:
        fresh = Scheduler(self.leader.s, self.state, self.leader.t)
        self.run(fresh._rebuild())
        # A reload holds the models with copies, pins, queued loads or waiting requests
        # (reload.py), the leader also those it was asked for since: equal on the models both
        # hold, and every model with a copy is in both.
        both = set(fresh.view.models) & set(self.leader.view.models)
        assert set(fresh.view.copies) | set(self.leader.view.copies) <= both
        assert _view_state(self.leader, both) == _view_state(fresh, both)


def _view_state(s: Scheduler, models: set[str] | None = None) -> dict[str, Any]:
    v = s.view
    mvs = {m: mv for m, mv in v.models.items() if models is None or m in models}
    pods = sorted(set(v.pods) | set(v.index()))
    return {
        "copies": {m: dict(cs) for m, cs in v.copies.items()},
        "excluded": dict(v.excluded),
        "sizes": {m: mv.size for m, mv in mvs.items()},
        "bases": {m: mv.base for m, mv in mvs.items() if mv.base},
        "adapters_here": {p: dict(v.index()[p].adapters) for p in pods if p in v.index() and v.index()[p].adapters},
        "pods": sorted(v.pods),
        "index": {p: (v.used(p), v.unloading(p), v.loading(p), dict(v.pod_models(p))) for p in pods if v.pod_models(p)},
        "queues": {p: dict(q) for p, q in s.queues.items() if q},
    }


def test_leader_keeps_its_invariants() -> None:
    run_state_machine_as_test(
        LeaderMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)),
    )


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


def test_leader_keeps_its_invariants_on_valkey(valkey: Any) -> None:
    class OnValkey(LeaderMachine):
        redis_url = valkey.url

    run_state_machine_as_test(
        OnValkey,
        settings=settings(max_examples=10, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)),
    )
