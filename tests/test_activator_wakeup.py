"""Kind: unit, with an in-memory stand-in for the state reads. The activator's held requests
wake when their model's placement changes, each of them, however their reads interleave; and
its per-model bookkeeping goes when nothing is held for the model (issue 15)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry import trace

from meshserve.model import Copy, CopyState, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_placement.activator import Activator


class GatedState:
    """copies() reads the placement when called and answers when its gate opens: a slow read
    that a change overtakes."""

    def __init__(self) -> None:
        self.placement = {"p0": Copy(CopyState.LOADING, 1)}
        self.gates: list[asyncio.Event] = []
        self.r: Any = None

    async def copies(self, model_id: str) -> dict[str, Copy]:
        seen = dict(self.placement)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return seen

    async def pod(self, pod_id: str) -> Pod:
        return Pod(pod_id, "127.0.0.1", 1, 2, 1 << 30)


async def test_a_change_during_one_waiters_read_wakes_it_whatever_the_others_do() -> None:
    state = GatedState()
    act = Activator(Settings(cold_start_timeout_seconds=10), state)  # type: ignore[arg-type]
    act._requested["m"] = time.time()  # its load was asked for already
    act._holding["m"] = 2  # the two requests below are held (ensure_loaded counts them)
    span = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    b = asyncio.create_task(act._wait_loaded("m", span))
    await asyncio.sleep(0.01)
    state.gates[0].set()  # B's first read: loading; B waits
    await asyncio.sleep(0.01)
    act.wake("m")  # something changed: B looks again, its read in flight...
    await asyncio.sleep(0.01)
    state.placement = {"p0": Copy(CopyState.LOADED, 1)}
    act.wake("m")  # ...and the load lands while that read is still out
    a = asyncio.create_task(act._wait_loaded("m", span))  # another request arrives meanwhile
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    for g in list(state.gates):
        g.set()  # B's stale read (loading) and A's fresh one (loaded) answer
    while len(state.gates) < 4 and time.monotonic() - t0 < 2:
        await asyncio.sleep(0.005)
        for g in list(state.gates):
            g.set()
    pods = await asyncio.wait_for(asyncio.gather(a, b), 2)
    # B saw the change it missed at once: before, it slept out its 1 s poll.
    assert time.monotonic() - t0 < 0.5
    assert [p.id for p in pods] == ["p0", "p0"]


async def test_per_model_entries_go_when_nothing_is_held() -> None:
    state = GatedState()
    state.placement = {"p0": Copy(CopyState.LOADED, 1)}
    act = Activator(Settings(), state)  # type: ignore[arg-type]

    async def open_gates() -> None:
        while True:
            for g in state.gates:
                g.set()
            await asyncio.sleep(0.001)

    opener = asyncio.create_task(open_gates())
    try:
        for i in range(50):
            act._requested[f"m{i}"] = time.time()  # asked for already: the stand-in has no Redis to ask on
            await act.ensure_loaded(f"m{i}")
    finally:
        opener.cancel()
    assert not act._waiters and not act._holding and not act._requested_by


class PipelinedState:
    """The first ask's one round trip (read the copies, queue the load request), counted."""

    def __init__(self) -> None:
        self.placement: dict[str, Copy] = {}
        self.asks = 0
        state = self

        class Pipe:
            async def __aenter__(self) -> "Pipe":
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            def hget(self, key: str, field: str) -> None:
                return None

            def xadd(self, *a: object, **kw: object) -> None:
                state.asks += 1

            async def execute(self) -> list[object]:
                return [copies_to_json(state.placement) if state.placement else None, b"1-0"]

        class R:
            def pipeline(self, transaction: bool = True) -> Pipe:
                return Pipe()

        self.r = R()

    async def copies(self, model_id: str) -> dict[str, Copy]:
        return dict(self.placement)

    async def pod(self, pod_id: str) -> Pod:
        return Pod(pod_id, "127.0.0.1", 1, 2, 1 << 30)


async def test_a_model_evicted_right_after_its_load_is_asked_for_again_at_once() -> None:
    """Under churn a model is loaded, served and evicted within a second. The next request for
    it must ask for a load at once: the ask was deduplicated for 2 s, so it waited for the
    1 s re-check (the 1 s tail of bench/churn.py's cold requests, issue 19 §3)."""
    state = PipelinedState()
    state.placement = {"p0": Copy(CopyState.LOADED, 1)}
    act = Activator(Settings(cold_start_timeout_seconds=10), state)  # type: ignore[arg-type]
    assert (await act.ensure_loaded("m")).id == "p0" and state.asks == 1
    state.placement = {}  # evicted
    held = asyncio.create_task(act.ensure_loaded("m"))
    await asyncio.sleep(0.05)
    assert state.asks == 2, "asked again at once"
    state.placement = {"p1": Copy(CopyState.LOADED, 1)}
    act.wake("m")
    assert (await asyncio.wait_for(held, 1)).id == "p1"
