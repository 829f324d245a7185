"""Kind: real server. The loader's progress publisher (ms:progress:<model>|<pod>) against a real
Valkey on 127.0.0.1 (stopped at the end): throttled writes, the final state, expiry of the
entry of a loader that goes away, and sink.Progress's callback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshserve_testing import devmesh
from meshserve.store import State, keys
from meshserve_loader.progress import ProgressPublisher
from meshserve_loader.sink import Budget, Progress, Sink


@pytest.fixture(scope="module")
def valkey() -> Iterator[Any]:
    with devmesh.valkey() as v:
        yield v


def _counting(pub: ProgressPublisher) -> list[dict[str, Any]]:
    """Record every document the publisher writes, in order."""
    written: list[dict[str, Any]] = []
    real = pub._write

    async def write(key: str, p: Any, ttl: float) -> None:
        written.append(json.loads(p.message().encode()))
        await real(key, p, ttl)

    pub._write = write  # type: ignore[method-assign]
    return written


async def test_throttled_then_marked_loaded(valkey: Any) -> None:
    state = State.from_url(valkey.url)
    try:
        pub = ProgressPublisher(state.r, "pod-0", interval=0.1, refresh=10.0, ttl=5.0, done_ttl=7.0)
        written = _counting(pub)
        key = keys.progress_key("m__isvc-01", "pod-0")
        seen = []
        async with pub.track("m__isvc-01") as p:
            total = 1000 * 1024
            for i in range(1, 1001):  # a thousand chunks over ~1 s
                p.pulled(i * 1024, total)
                if i % 100 == 0:
                    doc = json.loads(await state.r.get(key))
                    seen.append(doc["done_bytes"])
                    assert doc["phase"] == "pulling" and doc["total_bytes"] in (0, total)
                    assert 0 < await state.r.pttl(key) <= 5000
                await asyncio.sleep(0.001)
            p.loading()
            await asyncio.sleep(0.25)
            assert json.loads(await state.r.get(key))["phase"] == "loading"
        # ~1.3 s at most 10 writes a second, plus the first and the last: nowhere near 1000.
        assert 3 <= len(written) <= 20, len(written)
        assert seen == sorted(seen) and seen[-1] > seen[0]
        final = json.loads(await state.r.get(key))
        assert final["phase"] == "loaded" and final["done_bytes"] == final["total_bytes"] == total
        assert written[-1]["phase"] == "loaded"  # the loop's write in flight never lands after it
        assert 5000 < await state.r.pttl(key) <= 7000
        assert await state.progress([("m__isvc-01", "pod-0"), ("m__isvc-01", "pod-1")]) == {("m__isvc-01", "pod-0"): final}
    finally:
        await state.close()


async def test_a_background_load_over_within_the_interval_writes_nothing(valkey: Any) -> None:
    """The agent's loads (background): a tiny one finished before the first write was due costs
    no Redis write (bench/density.py); a longer one is published and then marked loaded."""
    state = State.from_url(valkey.url)
    try:
        pub = ProgressPublisher(state.r, "pod-0", interval=0.2)
        written = _counting(pub)
        async with pub.track("tiny__isvc-03", background=True):
            await asyncio.sleep(0.01)
        async with pub.track("slow__isvc-04", background=True):
            await asyncio.sleep(0.5)
        await asyncio.gather(*pub._pending)
        assert await state.r.get(keys.progress_key("tiny__isvc-03", "pod-0")) is None
        assert json.loads(await state.r.get(keys.progress_key("slow__isvc-04", "pod-0")))["phase"] == "loaded"
        assert written and written[-1]["phase"] == "loaded" and len(written) <= 5
    finally:
        await state.close()


async def test_failure_carries_the_reason(valkey: Any) -> None:
    state = State.from_url(valkey.url)
    try:
        pub = ProgressPublisher(state.r, "pod-0", interval=0.05)
        with pytest.raises(ValueError):
            async with pub.track("bad__isvc-02"):
                raise ValueError("corrupt.joblib: not a joblib file")
        doc = json.loads(await state.r.get(keys.progress_key("bad__isvc-02", "pod-0")))
        assert doc["phase"] == "failed" and doc["reason"] == "corrupt.joblib: not a joblib file"
    finally:
        await state.close()


async def test_entry_of_a_vanished_loader_expires(valkey: Any) -> None:
    """A loader killed mid-pull writes nothing more: its entry goes by itself, within the TTL.
    (Cancelling the load is the in-process stand-in: nothing is written after it.)"""
    state = State.from_url(valkey.url)
    try:
        pub = ProgressPublisher(state.r, "pod-3", interval=0.05, refresh=0.2, ttl=0.6)
        key = keys.progress_key("gone__isvc-03", "pod-3")

        async def stalled_pull() -> None:
            async with pub.track("gone__isvc-03") as p:
                p.pulled(10, 100)
                await asyncio.sleep(30)

        t = asyncio.create_task(stalled_pull())
        await asyncio.sleep(1.0)  # longer than the TTL: the refresh keeps a live (stalled) entry
        assert json.loads(await state.r.get(key))["done_bytes"] == 10
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.sleep(0.8)
        assert await state.r.get(key) is None
    finally:
        await state.close()


def test_sink_progress_calls_back_every_chunk_whatever_the_size(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    sink = Sink(tmp_path / "f", "f", Budget(1 << 20), Progress("f", 30, 1 << 30, lambda d, t: calls.append((d, t))))
    for _ in range(3):
        sink.write(b"x" * 10)
    sink.close()
    assert calls == [(10, 30), (20, 30), (30, 30)]
