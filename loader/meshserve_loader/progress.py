"""Publishing the progress of each pull and load to Redis, for `meshserve load` and `status`.

One string key per load, `ms:progress:<model>|<pod>` (meshserve/store/keys.py), holding a
messages.Progress (JSON: phase, done_bytes, total_bytes, started, updated, reason), with a TTL:

- throttled: a small task per load writes at most every `interval` (4 times a second), and
  only when something moved, so a fast pull costs a handful of writes however many chunks it has;
- kept alive: rewritten at least every `refresh` seconds even when nothing moved (a stalled
  pull, a long load into the runtime), and it expires `ttl` seconds after the last write, so
  the entry of a loader killed mid-pull vanishes by itself, with nobody to clean up;
- marked done: when the load ends the entry says `loaded` or `failed` (with the reason) and
  expires `done_ttl` seconds later, covering the moment before placement records the result.

Why a key per load and no index: the expiry is Redis's own (no clocks compared across hosts,
no cleanup loop, no SCAN), and readers need no index because ms:placements already lists the
in-flight loads: a copy in state `loading` on a pod is exactly a load that may have progress.

The byte counts come from `sink.Progress`'s callback, which may run in a worker thread (S3
pulls): it only stores two ints; every Redis write happens here, on the event loop. Publishing
is best effort: a Redis error is logged and never fails the load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import redis.asyncio as aioredis

from meshserve.store import ops
from meshserve.store.messages import Progress

log = logging.getLogger("meshserve.loader.progress")

PULLING, LOADING, LOADED, FAILED = "pulling", "loading", "loaded", "failed"


class LoadProgress:
    """One load's progress as the agent knows it."""

    def __init__(self) -> None:
        self.phase = PULLING
        self.done_bytes = 0
        self.total_bytes = 0
        self.started = time.time()
        self.reason = ""

    def pulled(self, done: int, total: int) -> None:
        """sink.Progress's callback: any thread, every chunk. Two stores, nothing else."""
        self.done_bytes, self.total_bytes = done, total

    def loading(self) -> None:
        """The files are local (pulled, from the disk cache, or a PVC): loading into the runtime."""
        self.phase = LOADING

    def message(self) -> Progress:
        return Progress(self.phase, self.done_bytes, self.total_bytes, self.started, time.time(), self.reason)

    def _mark(self) -> tuple[str, int, int]:
        return self.phase, self.done_bytes, self.total_bytes


NO_PROGRESS = LoadProgress()  # for callers that track nothing (its updates go nowhere)


class ProgressPublisher:
    def __init__(self, r: aioredis.Redis, pod_id: str, interval: float = 0.25, refresh: float = 2.0, ttl: float = 10.0, done_ttl: float = 15.0):
        self.r, self.pod_id = r, pod_id
        self.interval, self.refresh, self.ttl, self.done_ttl = interval, refresh, ttl, done_ttl
        self._pending: set[asyncio.Task[None]] = set()  # last writes of `background` tracks

    @asynccontextmanager
    async def track(self, model_id: str, background: bool = False) -> AsyncIterator[LoadProgress]:
        """Publish the progress of the load in the block; the block's outcome marks it done:
        `loaded` when it returns, `failed` with the exception's text when it raises.

        `background`: the block starts without waiting for the first write and ends without
        waiting for the last (both still happen, in order): the load on a cold request's path
        waits for no progress round trip (issue 19 §4). And a load over within one `interval`
        writes nothing: its result reaches placement as soon, and at 20,000 tiny loads the two
        writes were a quarter of the loader's work per load (bench/density.py)."""
        p = LoadProgress()
        key = model_id  # the store keys it by model and this pod
        stop = asyncio.Event()
        if background:
            task = asyncio.create_task(self._later_then_loop(key, p, stop))
        else:
            await self._write(key, p, self.ttl)
            task = asyncio.create_task(self._loop(key, p, stop))
        try:
            yield p
            p.phase = LOADED
        except Exception as e:
            p.phase, p.reason = FAILED, str(e) or type(e).__name__
            raise
        except BaseException:  # cancelled (the agent stops): the entry expires with its TTL
            p.phase = ""
            task.cancel()
            raise
        finally:
            if p.phase:
                # The loop finishes its write in flight first, so the final state is the last word.
                stop.set()
                if background:
                    t = asyncio.create_task(self._last(task, key, p))
                    self._pending.add(t)
                    t.add_done_callback(self._pending.discard)
                else:
                    await self._last(task, key, p)

    async def _later_then_loop(self, key: str, p: LoadProgress, stop: asyncio.Event) -> bool:
        """False when the load was over before the first write was due: nothing to mark done."""
        try:
            await asyncio.wait_for(stop.wait(), self.interval)
            return False
        except asyncio.TimeoutError:
            pass
        await self._write(key, p, self.ttl)
        await self._loop(key, p, stop)
        return True

    async def _last(self, task: "asyncio.Task[bool | None]", key: str, p: LoadProgress) -> None:
        if await task is not False:
            await self._write(key, p, self.done_ttl)

    async def _loop(self, key: str, p: LoadProgress, stop: asyncio.Event) -> None:
        last, written = p._mark(), time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
                return
            except asyncio.TimeoutError:
                pass
            mark = p._mark()
            if mark != last or time.monotonic() - written >= self.refresh:
                await self._write(key, p, self.ttl)
                last, written = mark, time.monotonic()

    async def _write(self, key: str, p: LoadProgress, ttl: float) -> None:
        try:
            await ops.set_progress(self.r, key, self.pod_id, p.message().encode(), ttl)
        except (aioredis.RedisError, OSError) as e:
            log.debug("publishing progress of %s: %s", key, e)
