"""One lease for every leader-elected process (the placement leader, the rollout controller):
taken with SET NX PX, kept with a compare-and-extend in one Lua call, so a holder whose lease
lapsed and was taken by another can never extend it back. (The rollout controller used GET then
PEXPIRE: between the two another could take it.) Writes a holder makes under its lease pass its
id as `State.commit(..., fence=holder, lease=key)`, so a deposed holder's write fails whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

import redis.asyncio as aioredis

log = logging.getLogger("meshserve.lease")
# A holder whose event loop has not run for this long lets its lease go (Lease.kept): long
# enough for a 100,000-model reload on a starved machine, short enough that a stuck holder fails over.
STALL_SECONDS = 30.0

RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class Lease:
    def __init__(self, r: Any, key: str, holder: str, seconds: float):
        self.r, self.key, self.holder = r, key, holder
        self.seconds = seconds
        self.ms = int(seconds * 1000)
        self._renew = r.register_script(RENEW_LUA)

    async def hold(self) -> bool:
        """True while this holder has the lease: taken if free, extended if ours, else False."""
        if await self.r.set(self.key, self.holder, nx=True, px=self.ms):
            return True
        return await self.renew()

    async def renew(self) -> bool:
        """Extend the lease if this holder still has it; never takes it back once lost."""
        return bool(await self._renew(keys=[self.key], args=[self.holder, self.ms]))

    @contextlib.asynccontextmanager
    async def kept(self, every: float | None = None, stall: float = STALL_SECONDS) -> AsyncIterator[asyncio.Event]:
        """Renew the lease while the block runs (a reload that takes longer than the lease must
        not lose it); the event is set once the lease is lost, or cannot be renewed, and the
        keeper stops then. The block decides what losing it means.

        The keeper renews from a thread of its own, with its own connection: on a starved
        machine the holder's event loop stalls for seconds (a leader parsing 100,000 models
        under load average 12 lost its 2 s lease on every reload, and reloaded again, for
        minutes: bench/density.py). It stops renewing once the holder's loop has not run for
        `stall` seconds, so a holder that is stuck for good still loses the lease. A client
        without a connection pool (the tests' in-memory fake) is renewed on this loop."""
        every = every or self.seconds / 3
        lost = asyncio.Event()
        pool = getattr(self.r, "connection_pool", None)
        if pool is None:
            task = asyncio.create_task(self._keep(every, lost))
            try:
                yield lost
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        beat = [time.monotonic()]
        ticker = asyncio.create_task(self._tick(every, beat))
        thread = threading.Thread(target=asyncio.run, name=f"lease-{self.key}",
                                  args=(self._keep_apart(pool, every, stall, beat, stop, lambda: loop.call_soon_threadsafe(lost.set)),),
                                  daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await asyncio.to_thread(thread.join, every * 2 + 1)

    @staticmethod
    async def _tick(every: float, beat: list[float]) -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(every)

    async def _keep_apart(self, pool: Any, every: float, stall: float, beat: list[float], stop: threading.Event, on_lost: Callable[[], Any]) -> None:
        r = aioredis.Redis(connection_pool=aioredis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs))
        renew = r.register_script(RENEW_LUA)
        try:
            while not stop.is_set():
                await asyncio.sleep(every)
                if stop.is_set():
                    return
                if time.monotonic() - beat[0] > stall:
                    log.warning("%s: its event loop has not run for %.0fs; letting the lease %s go", self.holder, time.monotonic() - beat[0], self.key)
                    ours = False
                else:
                    try:
                        ours = bool(await renew(keys=[self.key], args=[self.holder, self.ms]))
                    except Exception as e:  # noqa: BLE001 - redis gone: we can no longer tell we hold it
                        log.warning("renewing %s failed: %s", self.key, e)
                        ours = False
                if not ours:
                    log.warning("%s lost the lease %s", self.holder, self.key)
                    on_lost()
                    return
        finally:
            await r.aclose()

    async def _keep(self, every: float, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                ours = await self.renew()
            except Exception as e:  # noqa: BLE001 - redis gone: we can no longer tell we hold it
                log.warning("renewing %s failed: %s", self.key, e)
                ours = False
            if not ours:
                log.warning("%s lost the lease %s", self.holder, self.key)
                lost.set()
                return
