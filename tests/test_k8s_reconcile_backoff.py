"""Kind: unit (no API server, no Redis: the reconcile itself is a stand-in). A failing reconcile
(Redis down, an API hiccup) is retried with exponential backoff and jitter, not every second in
step with every other replica; the first success ends it, and stop() ends a backoff at once."""

from __future__ import annotations

import asyncio
import threading

from meshserve_controller.controller import Controller


def bare(fail: int, max_backoff: float = 30.0) -> tuple[Controller, list[float]]:
    """A controller with only what the retry loop needs; its reconcile fails `fail` times."""
    c = Controller.__new__(Controller)
    c._stopping = threading.Event()
    c.max_backoff = max_backoff
    calls = {"n": 0}
    slept: list[float] = []

    async def reconcile() -> None:
        calls["n"] += 1
        if calls["n"] <= fail:
            raise ConnectionError("redis down")

    async def pause(seconds: float) -> None:
        slept.append(seconds)

    c.reconcile = reconcile  # type: ignore[method-assign]
    c._pause = pause  # type: ignore[method-assign]
    return c, slept


def test_backs_off_exponentially_with_jitter_until_it_succeeds() -> None:
    c, slept = bare(fail=6)
    asyncio.run(c._reconcile_retrying())
    assert len(slept) == 6
    base = [0.5 * 2 ** i for i in range(6)]  # tenacity's wait_exponential(multiplier=0.5): 1, 2, 4 ... after the first
    assert all(b * 0.999 <= s for s, b in zip(slept[1:], base[1:])), slept
    assert slept[-1] > 8  # not a fixed one-second sleep
    assert all(s <= 30.0 + 1.0 for s in slept)


def test_backoff_is_capped_and_jittered() -> None:
    runs = []
    for _ in range(5):
        c, slept = bare(fail=12, max_backoff=2.0)
        asyncio.run(c._reconcile_retrying())
        assert max(slept) <= 3.0 and min(slept[5:]) >= 2.0
        runs.append(tuple(slept))
    assert len(set(runs)) > 1, "replicas retrying in step: no jitter"


def test_stop_ends_the_retries() -> None:
    c, slept = bare(fail=10**6)

    async def pause(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            c._stopping.set()

    c._pause = pause  # type: ignore[method-assign]
    try:
        asyncio.run(c._reconcile_retrying())
    except ConnectionError:
        pass
    assert len(slept) == 3
