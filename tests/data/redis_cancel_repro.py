"""Run by tests/test_redis_pin.py with a given redis-py: cancels tasks blocked in XREADGROUP (as a
leader stepping down does) while a writer keeps the stream busy, and prints `stuck <n>` when a
cancelled task did not finish within 2 s at attempt n, else `ok <n>`."""

import asyncio
import os
import random
import sys

import redis.asyncio as aioredis


async def main(url: str, n: int) -> None:
    r = aioredis.from_url(url)
    w = aioredis.from_url(url)
    try:
        await r.xgroup_create("g", "grp", id="0", mkstream=True)
    except aioredis.ResponseError:
        pass
    stop = False

    async def writer() -> None:
        while not stop:
            await w.xadd("g", {"a": "1"}, maxlen=1000)
            await asyncio.sleep(0.002)

    async def reader() -> None:
        while True:
            await r.xreadgroup("grp", "c", {"g": ">"}, count=10, block=50)

    wt = asyncio.create_task(writer())
    for i in range(1, n + 1):
        ts = [asyncio.create_task(reader()) for _ in range(4)]
        await asyncio.sleep(random.uniform(0.0, 0.1))
        for t in ts:
            t.cancel()
        _, pending = await asyncio.wait(ts, timeout=2)
        if pending:
            print("stuck", i, flush=True)
            os._exit(0)  # the stuck task would keep the loop from closing
    stop = True
    await wt
    print("ok", n, flush=True)


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
