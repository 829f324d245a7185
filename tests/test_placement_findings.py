"""Kind: unit tests of the placement leader and its view over an in-memory store fake
(tests/placement_fakes.py), plus one static check. One test per correctness finding of issue 15
that concerns placement, each failing on the code before the redesign:

- the view was changed before its commit, so a commit that failed left it ahead of Redis;
- a size a load reported was written into the model's view in place, leaving its eviction key
  (and so the eviction order) stale;
- `ClusterView.copies` was a dict subclass that kept the index only for some writes
  (`update`, `setdefault`, `clear`, `popitem` went around it), and `place()` read `__dict__`;
- a handler that failed had its stream entry acknowledged as done;
- a pin request through the repository API called a method that did not exist.
"""

from __future__ import annotations

import ast
import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshserve.model import Copy, CopyState, ModelSpec, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_POD, LoadRequest, LoadResult
from meshserve_placement import policy
from meshserve_placement.leader import CONSUMER, GROUP, Scheduler
from meshserve_placement.tuning import Tuning
from tests.placement_fakes import FakeRedis

MB = 1 << 20
PLACEMENT = Path(__file__).resolve().parents[1] / "placement" / "meshserve_placement"


async def _leader(pods: dict[str, int], models: dict[str, int], **tuning: Any) -> tuple[FakeRedis, Scheduler]:
    r = FakeRedis()
    state = State(r)
    await r.zadd(k.HEARTBEATS, {p: time.time() + 3600 for p in pods})
    await state.commit([ops.set_pod(Pod(p, "127.0.0.1", 1, 2, n, ["sklearn"])) for p, n in pods.items()], [(KIND_POD, p) for p in pods])
    await state.register_models([ModelSpec(id=m, alias=m, format="sklearn", size_hint=n, storage={"path": "x"}) for m, n in models.items()])
    sched = Scheduler(Settings(redis_url="redis://unused", lease_seconds=5.0), state, Tuning(**{"busy_window_seconds": 0.0, **tuning}))
    await r.set(k.LEASE, sched.id)
    await sched._reload()
    return r, sched


async def _handle(sched: Scheduler, coro: Any) -> None:
    async with sched._deciding():
        await coro


async def test_a_failed_commit_leaves_the_view_as_it_was() -> None:
    r, sched = await _leader({"p0": 100 * MB}, {"a": 40 * MB})
    before = {m: dict(cs) for m, cs in sched.view.copies.items()}, sched.view.used("p0"), dict(sched.queues)
    r.fail_next = True
    with pytest.raises(Exception, match="connection lost"):
        await _handle(sched, sched._on_load_request(LoadRequest("a").encode()))
    assert ({m: dict(cs) for m, cs in sched.view.copies.items()}, sched.view.used("p0"), dict(sched.queues)) == before
    assert await r.hget(k.PLACEMENTS, "a") is None
    # The next try goes through and books it.
    await _handle(sched, sched._on_load_request(LoadRequest("a").encode()))
    assert sched.view.copies["a"]["p0"].state == CopyState.LOADING and sched.view.used("p0") == 40 * MB


async def test_a_reported_size_moves_the_models_eviction_order() -> None:
    """Through the leader: b lands first (older), then a, stated at 10 MB, reports 60 MB. A
    bigger model is cheaper to keep out (eviction_key), so a newcomer that needs room evicts a,
    not b. (The landing touches a, which re-keys it either way; the view-level test below is
    the one that tells a stale key apart.)"""
    r, sched = await _leader({"p0": 100 * MB}, {"a": 10 * MB, "b": 30 * MB, "c": 40 * MB})
    for m, size in (("b", 30 * MB), ("a", 60 * MB)):
        await _handle(sched, sched._on_load_request(LoadRequest(m).encode()))
        await _handle(sched, sched._on_event(LoadResult("p0", m, True, size).encode()))
        await asyncio.sleep(0.01)
    assert sched.view.models["a"].size == 60 * MB
    sched.view.in_flight.clear()  # both idle now
    await _handle(sched, sched._on_load_request(LoadRequest("c").encode()))
    assert sched.view.copies["a"]["p0"].state == CopyState.UNLOADING, sched.last_decisions["c"].explain()
    assert sched.view.copies["b"]["p0"].state == CopyState.LOADED


def test_a_new_size_moves_the_eviction_key() -> None:
    """The view-level half: once a model's size changes, the heaps order it by the new size,
    touched again or not (the leader's background loads are not touched when they land)."""
    pods = {"p": policy.PodView("p", 100 * MB, ["sklearn"])}
    models = {"a": policy.ModelView("a", "sklearn", 10 * MB), "b": policy.ModelView("b", "sklearn", 30 * MB)}
    cv = policy.ClusterView(pods=pods, models=models)
    cv.set_copies("b", {"p": Copy(CopyState.LOADED, 30 * MB)})
    cv.set_copies("a", {"p": Copy(CopyState.LOADED, 10 * MB)})
    cv.touch("b", 100.0)
    cv.touch("a", 101.0)
    assert cv.victims("p", 1)[0] == ["b"]  # both kept for their size; b is older and bigger
    cv.set_model(replace(cv.models["a"], size=60 * MB))
    cv.set_copies("a", {"p": Copy(CopyState.LOADED, 60 * MB)})
    assert cv.victims("p", 1)[0] == ["a"]  # 60 MB used once is now the cheapest to keep out


def test_the_view_index_cannot_be_bypassed() -> None:
    cv = policy.ClusterView(pods={"p": policy.PodView("p", 100 * MB, ["sklearn"])}, models={"a": policy.ModelView("a", "sklearn", 10 * MB)})
    for write in (
        lambda: cv.copies.update({"a": {"p": Copy(CopyState.LOADED, 10 * MB)}}),  # type: ignore[attr-defined]
        lambda: cv.copies.setdefault("a", {"p": Copy(CopyState.LOADED, 10 * MB)}),  # type: ignore[attr-defined]
        lambda: cv.copies.__setitem__("a", {}),  # type: ignore[attr-defined]
        lambda: cv.models.__setitem__("a", policy.ModelView("a", "sklearn", 1)),  # type: ignore[attr-defined]
    ):
        with pytest.raises((TypeError, AttributeError)):
            write()
    cv.set_copies("a", {"p": Copy(CopyState.LOADED, 10 * MB)})
    assert cv.used("p") == 10 * MB and list(cv.evictable("p")) == ["a"]


def test_no_placement_module_reaches_into_an_objects_dict() -> None:
    offenders = []
    for path in sorted(PLACEMENT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "__dict__":
                offenders.append(f"{path.name}:{node.lineno}: __dict__")
            if isinstance(node, ast.FunctionDef) and node.name == "__setattr__":
                offenders.append(f"{path.name}:{node.lineno}: __setattr__ override")
    assert not offenders, offenders


async def test_a_failing_handler_is_handled_again_not_acknowledged() -> None:
    r, sched = await _leader({"p0": 100 * MB}, {"a": 40 * MB})
    await ops.ensure_group(r, k.LOAD_REQUESTS, GROUP)
    seen: list[str] = []

    async def flaky(f: dict[str, str]) -> None:
        seen.append(f["model"])
        if len(seen) == 1:
            raise RuntimeError("a bug in a handler")

    await ops.request_load(r, LoadRequest("a"))
    task = asyncio.create_task(sched._consume(k.LOAD_REQUESTS, flaky))
    try:
        for _ in range(200):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert seen == ["a", "a"]
    assert await r.xreadgroup(GROUP, CONSUMER, {k.LOAD_REQUESTS: "0"}, count=10) == []  # acknowledged after it succeeded


async def test_a_pin_request_pins_the_model() -> None:
    r, sched = await _leader({"p0": 100 * MB}, {"a": 40 * MB})
    await _handle(sched, sched._on_load_request(LoadRequest("a", "pin").encode()))
    assert await r.hget(k.PINS, "a") is not None
    assert sched.view.models["a"].pinned
    assert sched.view.copies["a"]["p0"].state == CopyState.LOADING  # a pin loads a copy too
    await _handle(sched, sched._on_load_request(LoadRequest("a", "unpin").encode()))
    assert await r.hget(k.PINS, "a") is None and not sched.view.models["a"].pinned
