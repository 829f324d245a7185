"""One lease for every leader-elected process (the rollout controller; placement has its own
keeper task around the same renew): taken with SET NX PX, kept with a compare-and-extend in one
Lua call, so a holder whose lease lapsed and was taken by another can never extend it back.
(The rollout controller used GET then PEXPIRE: between the two another could take it.)"""

from __future__ import annotations

from typing import Any

RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class Lease:
    def __init__(self, r: Any, key: str, holder: str, seconds: float):
        self.r, self.key, self.holder = r, key, holder
        self.ms = int(seconds * 1000)
        self._renew = r.register_script(RENEW_LUA)

    async def hold(self) -> bool:
        """True while this holder has the lease: taken if free, extended if ours, else False."""
        if await self.r.set(self.key, self.holder, nx=True, px=self.ms):
            return True
        return bool(await self._renew(keys=[self.key], args=[self.holder, self.ms]))
