"""The placement leader's reload, before against after, side by side on one filled Valkey.

`bench/million.py` times the whole control plane once; this times only the leader's view
rebuild (`Scheduler._rebuild`, what runs between "took the placement lease" and "state
reloaded") for two checkouts of the code, alternating, on the same data in the same run, so
the load average of a shared machine hits both alike. Each reload runs in a fresh process
(PYTHONPATH puts the checkout's packages first) and reports:

- reload_s: the rebuild's wall time;
- rss_mib: the process's RSS after it (and a gc), and its growth over the rebuild;
- loop_hold_ms: the longest the event loop went without running a 10 ms ticker during the
  rebuild (the lease is kept by a thread, but heartbeats and streams wait on the loop);
- walk_s, walk_loop_hold_ms: the same for the registry walk that follows a reload where the
  code has one (`_find_kept`: models that must keep copies but have none); RSS is after it.

    git archive <before> | tar -x -C /tmp/before
    .venv/bin/python -m bench.leader_reload --before /tmp/before [--registered 200000] [--loaded 20000] [--rounds 2]

Writes bench/results/leader_reload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, write
from bench.million import fill
from meshserve_testing import devmesh

CHILD = r"""
import asyncio, gc, json, sys, time
from pathlib import Path

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0

async def main(url):
    import meshserve_placement
    from meshserve.settings import Settings
    from meshserve.store import State
    from meshserve_placement.leader import Scheduler
    state = State.from_url(url)
    s = Scheduler(Settings(redis_url=url), state)
    gc.collect()
    r0 = rss()
    hold = [0.0]
    stop = asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            hold[0] = max(hold[0], now - last - 0.01)
            last = now

    tick = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await s._rebuild()
    t1 = time.perf_counter()
    doc = {"code": meshserve_placement.__file__, "reload_s": round(t1 - t0, 2), "loop_hold_ms": round(hold[0] * 1000),
           "models": len(s.view.models)}
    if hasattr(s, "_find_kept"):  # the registry walk that follows a reload (after only)
        hold[0] = 0.0
        t2 = time.perf_counter()
        await s._find_kept()
        doc["walk_s"] = round(time.perf_counter() - t2, 2)
        doc["walk_loop_hold_ms"] = round(hold[0] * 1000)
    stop.set()
    await tick
    gc.collect()
    r1 = rss()
    doc.update(rss_mib=round(r1, 1), rss_growth_mib=round(r1 - r0, 1))
    print(json.dumps(doc))
    await state.close()

asyncio.run(main(sys.argv[1]))
"""


def _paths(root: Path) -> str:
    return os.pathsep.join(str(root / d) for d in ("placement", "", "xds", "loader", "testing"))


def reload_once(root: Path, url: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": _paths(root)}
    out = subprocess.run([sys.executable, "-c", CHILD, url], env=env, cwd=str(root), capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["code"].startswith(str(root)), doc["code"]  # the checkout's code ran, not the installed one
    return doc


def run(before: Path, registered: int, loaded: int, pods: int, rounds: int) -> dict[str, Any]:
    res: dict[str, Any] = {"registered": registered, "loaded": loaded, "pods": pods, "runs": {"before": [], "after": []}}
    with devmesh.valkey() as v:
        res["fill_s"] = round(asyncio.run(fill(v.url, registered, loaded, pods)), 1)
        print(f"filled in {res['fill_s']} s", flush=True)
        for i in range(rounds):
            # Alternate which goes first, so neither always gets the warmer Valkey.
            order = [("before", before), ("after", REPO)] if i % 2 == 0 else [("after", REPO), ("before", before)]
            for label, root in order:
                doc = reload_once(root, v.url)
                doc["load_avg"] = round(os.getloadavg()[0], 1)
                res["runs"][label].append(doc)
                print(label, doc, flush=True)
    for label in ("before", "after"):
        runs = res["runs"][label]
        res[label] = {key: min(r[key] for r in runs) for key in ("reload_s", "rss_mib", "rss_growth_mib", "loop_hold_ms")}
    res["ratio_reload"] = round(res["before"]["reload_s"] / max(res["after"]["reload_s"], 1e-9), 2)
    res["ratio_rss_growth"] = round(res["before"]["rss_growth_mib"] / max(res["after"]["rss_growth_mib"], 1e-9), 2)
    res["load_avg"] = round(os.getloadavg()[0], 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--registered", type=int, default=200_000)
    ap.add_argument("--loaded", type=int, default=20_000)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    res = run(args.before.resolve(), args.registered, args.loaded, args.pods, args.rounds)
    res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    write("leader_reload", res)


if __name__ == "__main__":
    main()
