"""Debounce windows on the production path (issue 3): real Valkey, the real RedisSource and cache.

For each (quiet, max) pair it measures:
- lone: 20 placement changes, one at a time: from the commit returning to the snapshot cache
  holding that revision (p50/max, ms);
- burst: 300 placement commits written as fast as one client can: how many rebuilds they
  caused and how long until the last one was in the cache.

    .venv/bin/python -m bench.xds_debounce --models 500

Writes bench/results/xds_debounce.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.model import Copy, CopyState, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_testing.xds_harness import AdsThread
from meshserve_xds.source import RedisSource

RESULTS = Path(__file__).resolve().parent / "results" / "xds_debounce.json"


def builds() -> float:
    return (REGISTRY.get_sample_value("meshserve_xds_build_seconds_count") or 0.0)


async def commit(s: st.State, model: str, pod: str) -> int:
    return await s.commit([["HSET", st.PLACEMENTS, model, copies_to_json({pod: Copy(CopyState.LOADED)})]], [(st.KIND_PLACEMENT, model)])


def run(url: str, models: list[str], quiet: int, max_ms: int) -> dict[str, Any]:
    ads = AdsThread().start()
    try:
        state = ads.call(_state(url))
        assert ads.cache is not None
        src = RedisSource(Settings(redis_url=url, debounce_quiet_ms=quiet, debounce_max_ms=max_ms), state, ads.cache)
        task = asyncio.run_coroutine_threadsafe(src.run(), ads.loop)
        writer = st.State.from_url(url)
        loop = asyncio.new_event_loop()
        try:
            rev = loop.run_until_complete(writer.rev())
            devmesh.wait_until(lambda: src.rev >= rev, 30, "source built")
            lone = []
            for i in range(20):
                rev = loop.run_until_complete(commit(writer, models[i], f"p{i % 2}"))
                t0 = time.monotonic()
                devmesh.wait_until(lambda: src.rev >= rev, 30, "change applied", interval=0.0005)
                lone.append((time.monotonic() - t0) * 1e3)
                time.sleep(0.05)
            b0 = builds()
            t0 = time.monotonic()
            for i in range(300):
                rev = loop.run_until_complete(commit(writer, models[i % len(models)], f"p{(i + 1) % 2}"))
            written = time.monotonic() - t0
            devmesh.wait_until(lambda: src.rev >= rev, 60, "burst applied", interval=0.0005)
            done = time.monotonic() - t0
            return {
                "quiet_ms": quiet, "max_ms": max_ms, "models": len(models),
                "lone_ms": {"p50": round(statistics.median(lone), 1), "max": round(max(lone), 1)},
                "burst": {"commits": 300, "written_s": round(written, 3), "rebuilds": int(builds() - b0), "last_applied_s": round(done, 3)},
            }
        finally:
            loop.run_until_complete(writer.close())
            loop.close()
            task.cancel()
            ads.call(state.close())
    finally:
        ads.stop()


async def _state(url: str) -> st.State:
    return st.State.from_url(url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=500)
    args = ap.parse_args()
    out = []
    with devmesh.valkey() as v:
        models = [f"m{i}__isvc-{i:010x}" for i in range(args.models)]
        pods = [Pod(f"p{i}", "127.0.0.1", 9000 + i, 9100 + i, 1 << 30) for i in range(2)]

        async def seed() -> None:
            s = st.State.from_url(v.url)
            await s.commit(
                [["HSET", st.PODS, p.id, p.to_json()] for p in pods]
                + [["HSET", st.PLACEMENTS, m, copies_to_json({f"p{i % 2}": Copy(CopyState.LOADED)})] for i, m in enumerate(models)]
                + [["HSET", st.ALIASES, m.split("__")[0], m] for m in models],
                [(st.KIND_POD, p.id) for p in pods],
            )
            await s.close()

        asyncio.run(seed())
        for quiet, max_ms in [(1, 1), (20, 200), (100, 10_000)]:
            res = run(v.url, models, quiet, max_ms)
            print(json.dumps(res), flush=True)
            out.append(res)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
