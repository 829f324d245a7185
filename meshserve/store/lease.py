"""One lease for every leader-elected process (the placement leader, the rollout controller):
taken with SET NX PX, kept with a compare-and-extend in one Lua call, so a holder whose lease
lapsed and was taken by another can never extend it back. (The rollout controller used GET then
PEXPIRE: between the two another could take it.) Writes a holder makes under its lease pass its
id as `State.commit(..., fence=holder, lease=key)`, so a deposed holder's write fails whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

log = logging.getLogger("meshserve.lease")

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
    async def kept(self, every: float | None = None) -> AsyncIterator[asyncio.Event]:
        """Renew the lease in a task of its own while the block runs (a reload that takes longer
        than the lease must not lose it); the event is set once the lease is lost, or cannot be
        renewed, and the keeper stops then. The block decides what losing it means."""
        lost = asyncio.Event()
        task = asyncio.create_task(self._keep(every or self.seconds / 3, lost))
        try:
            yield lost
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

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
