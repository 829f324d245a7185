"""Kind: real Valkey, the placement leader in process, the pods' runtimes faked in memory (their
loaders' orders read from the real order streams, their results sent to the leader's handlers).

A base rolled to a new version under adapters that are loaded over it (issue 17, "a base is
never evicted while its adapters are resident"). The fake runtime shares a base as the built-in
one does (loader/meshserve_loader/builtin/table.py): an adapter resolves its base's name when
it loads, and a base's weights stay in memory while any adapter loaded over them is there, even
after the base's own model is unloaded. What a user would notice, checked after every step:
- the bytes placement books on a pod (booked copies, and unloads not yet confirmed) are what
  the pod's runtime holds;
- the adapters stay loaded and routed (LOADED) through the roll;
- the old base's unload goes only once no adapter on that pod uses it, and then it goes;
- an adapter loaded after the roll goes over the new base;
- a leader that takes over in the middle finds the same bookings.
The rollout controller's part is played by its two requests (withdraw, then retire), as
rollout/meshserve_rollout/controller.py sends them after moving the alias.
"""

from __future__ import annotations

import time

import pytest
from dataclasses import dataclass, field
from typing import Any

from meshserve.model import CopyState, ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_ALIAS, KIND_MODEL, KIND_POD, LoadRequest, LoadResult, UnloadResult
from meshserve_placement.leader import Scheduler
from meshserve_placement.tuning import Tuning
from meshserve_placement.view import HELD, booked

MB = 1 << 20
PODS = ("p0", "p1")
V1, V2 = "minilm__v1", "minilm__v2"


def _spec(mid: str, alias: str, size: int, base: str = "") -> ModelSpec:
    return ModelSpec(id=mid, alias=alias, format="sklearn", size_hint=size, storage={"path": mid}, base=base)


@dataclass
class FakeRuntime:
    """One pod's runtime: models by name and the bases its adapters share, by base id."""

    models: dict[str, int] = field(default_factory=dict)  # name -> its own bytes
    bases: dict[str, tuple[int, set[str]]] = field(default_factory=dict)  # base id -> (bytes, users)

    def memory(self) -> int:
        own = sum(n for m, n in self.models.items() if m not in self.bases)
        return own + sum(n for n, _ in self.bases.values())

    def load(self, spec: ModelSpec, base_id: str, sizes: dict[str, int]) -> int:
        """Load `spec` (over `base_id` for an adapter, as the alias resolves now); its reported size."""
        if not spec.base:
            n, users = self.bases.get(spec.id, (sizes[spec.id], set()))
            self.bases[spec.id] = (n, users | {spec.id})
            self.models[spec.id] = n
            return n
        own = sizes[spec.id]
        brought = 0
        if base_id not in self.bases:  # not resident: this load brings it (and reports it)
            brought = sizes[base_id]
            self.bases[base_id] = (brought, set())
        n, users = self.bases[base_id]
        self.bases[base_id] = (n, users | {spec.id})
        self.models[spec.id] = own
        return own + brought

    def unload(self, model: str) -> None:
        self.models.pop(model, None)
        for b, (n, users) in list(self.bases.items()):
            users.discard(model)
            if not users:  # its weights go with the last model using them
                del self.bases[b]


class Mesh:
    def __init__(self, state: State):
        self.state, self.r = state, state.r
        self.pods = {p: FakeRuntime() for p in PODS}
        self.cursor = {p: "0-0" for p in PODS}
        self.sizes = {V1: 90 * MB, V2: 90 * MB, "a1": 1 * MB, "a2": 1 * MB, "a3": 1 * MB}
        self.leader: Scheduler

    async def start(self) -> None:
        await self.r.zadd(k.HEARTBEATS, {p: time.time() + 3600 for p in PODS})
        await self.state.commit([ops.set_pod(Pod(p, "127.0.0.1", 1, 2, 200 * MB, ["sklearn"])) for p in PODS], [(KIND_POD, p) for p in PODS])
        await self.state.register_models([_spec(V1, "minilm", 90 * MB)] + [_spec(a, a, MB, base="minilm") for a in ("a1", "a2", "a3")])
        await self.new_leader()

    async def new_leader(self) -> None:
        s = Settings(redis_url="redis://unused", heartbeat_seconds=1.0, lease_seconds=5.0)
        self.leader = Scheduler(s, self.state, Tuning(busy_window_seconds=0.0))
        await self.r.set(k.LEASE, self.leader.id)
        await self.leader._reload()

    async def handle(self, fn: Any) -> None:
        async with self.leader._deciding():
            await fn()

    async def ask(self, model: str, op: str = "load") -> None:
        await self.handle(lambda: self.leader._on_load_request(LoadRequest(model, op, why="superseded by " + V2).encode()))
        await self.run_pods()

    async def run_pods(self) -> list[tuple[str, str, str]]:
        """Carry out every order sent, until none is left; the orders, in order."""
        done = []
        while True:
            batch = []
            for p in PODS:
                for eid, f in await self.r.xrange(k.orders_key(p), min="(" + self.cursor[p]):
                    self.cursor[p] = eid.decode()
                    batch.append((p, f[b"op"].decode(), f[b"model"].decode(), f.get(b"spec")))
            if not batch:
                return done
            for p, op, model, raw in batch:
                done.append((p, op, model))
                rt = self.pods[p]
                if op == "load":
                    # As the loader: the base the order's spec names, resolved when it loads.
                    spec = ModelSpec.from_json(raw)
                    base_id = (await self.state.resolve(spec.base) or "") if spec.base else ""
                    ev: Any = LoadResult(p, model, True, rt.load(spec, base_id, self.sizes), "")
                else:
                    rt.unload(model)
                    ev = UnloadResult(p, model, True, 0, "")
                await self.handle(lambda: self.leader._on_event(ev.encode()))

    async def placed(self) -> dict[str, dict[str, Any]]:
        return (await self.state.snapshot()).placements

    async def check_booked_is_held(self) -> None:
        """On every pod, what placement books (and unloads it waits for) is what the runtime holds."""
        placed = await self.placed()
        for p in PODS:
            booked_here = sum(c.size for cs in placed.values() for q, c in cs.items() if q == p
                              and (booked(c) or c.state == CopyState.UNLOADING))
            assert booked_here == self.pods[p].memory(), (p, booked_here / MB, self.pods[p])
            assert self.leader.view.used(p) + self.leader.view.unloading(p) == booked_here


@pytest.mark.parametrize("follow", [True, False], ids=["alias-followed", "at-withdrawal"])
async def test_a_base_rolled_under_its_adapters_stays_booked_until_they_leave(state: State, follow: bool) -> None:
    """`follow`: the leader's spec refresh sees the alias move before the withdrawal comes (and
    re-points the adapters then), or not (the withdrawal re-points them)."""
    m = Mesh(state)
    await m.start()
    for a in ("a1", "a2"):
        await m.ask(a)
    placed = await m.placed()
    (pod, c), = placed[V1].items()  # the base came with the first adapter, the second went beside it
    assert c.state == CopyState.LOADED and {p for a in ("a1", "a2") for p in placed[a]} == {pod}
    await m.check_booked_is_held()

    # The rollout: v2 registered and loaded, then the alias moves to it.
    await state.commit([["HSET", k.MODELS, V2, _spec(V2, "minilm", 90 * MB).to_json()]], [(KIND_MODEL, V2)])
    await m.ask(V2)
    await state.commit([ops.set_alias("minilm", V2)], [(KIND_ALIAS, "minilm")])
    if follow:
        await m.leader._refresh_specs()  # what the maintain loop runs every rate poll
        assert {m.leader.view.models[a].base for a in ("a1", "a2")} == {V2}
        await m.check_booked_is_held()
    # ... and, after its drain, asks placement to withdraw v1's routes, then to unload it.
    await m.ask(V1, "withdraw")
    v1 = (await m.placed())[V1][pod]
    assert v1.state == CopyState.UNLOADING and v1.reason.startswith(HELD)  # no route; still booked
    await m.check_booked_is_held()
    sent = await m.run_pods()
    await m.handle(lambda: m.leader._on_load_request(LoadRequest(V1, "retire", why="superseded by " + V2).encode()))
    sent += await m.run_pods()
    assert (pod, "unload", V1) not in sent  # a1 and a2 still use its weights there
    placed = await m.placed()
    assert placed[V1][pod].reason.startswith(HELD)
    for a in ("a1", "a2"):  # the adapters answer through the roll: loaded and routed
        assert placed[a] == {pod: placed[a][pod]} and placed[a][pod].state == CopyState.LOADED
    await m.check_booked_is_held()
    assert {m.leader.view.models[a].base for a in ("a1", "a2")} == {V2}  # re-pointed at once
    # A request for v1's own id meanwhile: its kept copy serves it again (routed), no load order.
    await m.handle(lambda: m.leader._on_load_request(LoadRequest(V1).encode()))
    assert (await m.placed())[V1][pod].state == CopyState.LOADED and await m.run_pods() == []
    await m.check_booked_is_held()
    await m.ask(V1, "withdraw")  # and the rollout's requests again: kept again for a1 and a2
    await m.ask(V1, "retire")
    assert (await m.placed())[V1][pod].reason.startswith(HELD)

    # An adapter loaded now goes over v2 (booked with it where the pod lacks it) and reports its own bytes.
    await m.ask("a3")
    placed = await m.placed()
    (p3, c3), = placed["a3"].items()
    assert c3.size == MB and placed[V2][p3].state == CopyState.LOADED
    await m.check_booked_is_held()

    # A new leader takes over: it finds v1 still held for a1 and a2, and books the same.
    before = {p: dict(ix.adapters) for p, ix in m.leader.view.index().items() if ix.adapters}
    await m.new_leader()
    assert {p: dict(ix.adapters) for p, ix in m.leader.view.index().items() if ix.adapters} == before
    await m.check_booked_is_held()

    # The adapters leave (evicted, idle): v1 goes only after the last of them.
    await m.handle(lambda: m.leader._unload("a1", pod, "test: idle"))
    sent = await m.run_pods()
    assert (pod, "unload", V1) not in sent and (await m.placed())[V1][pod].reason.startswith(HELD)
    await m.check_booked_is_held()
    await m.handle(lambda: m.leader._unload("a2", pod, "test: idle"))
    sent = await m.run_pods()
    assert sent[-1] == (pod, "unload", V1), sent
    assert V1 not in await m.placed() and V1 not in m.pods[pod].bases
    await m.check_booked_is_held()
    assert not m.leader._held


async def test_the_copy_reconcile_moves_the_adapters_onto_the_new_base_copy_first(state: State) -> None:
    """Hot adapters need not wait to be evicted: the copy reconcile gives each a copy over v2
    (beside v2 on the other pod), then unloads the one over v1; v1 goes after the last. Every
    adapter has a loaded copy at every step, and booked equals held throughout."""
    m = Mesh(state)
    await m.start()
    for a in ("a1", "a2"):
        await m.ask(a)
    (pod, _), = (await m.placed())[V1].items()
    await state.commit([["HSET", k.MODELS, V2, _spec(V2, "minilm", 90 * MB).to_json()]], [(KIND_MODEL, V2)])
    await m.ask(V2)
    await state.commit([ops.set_alias("minilm", V2)], [(KIND_ALIAS, "minilm")])
    await m.ask(V1, "withdraw")
    await m.ask(V1, "retire")
    (other,) = set(PODS) - {pod}
    assert set((await m.placed())[V2]) == {other}
    for _ in range(6):  # maintain rounds: a copy over v2 first, then the stale one goes
        await m.handle(lambda: m.leader._reconcile_copies(time.time()))
        await m.run_pods()
        placed = await m.placed()
        for a in ("a1", "a2"):
            assert any(c.state == CopyState.LOADED for c in placed[a].values()), (a, placed[a])
        await m.check_booked_is_held()
        if V1 not in placed:
            break
    placed = await m.placed()
    assert V1 not in placed and V1 not in m.pods[pod].bases, placed
    assert {a: set(placed[a]) for a in ("a1", "a2")} == {"a1": {other}, "a2": {other}}
    assert m.pods[other].bases[V2][1] == {V2, "a1", "a2"}  # over v2, which the pod holds once
