"""Density (issue 10, item 2): 100,000 registered models, 20,000 tiny string models loaded
across the local pods. Reports the RSS of every component and of Envoy, the time to reach all
loaded, and the gateway latency for random loaded models.

Loads go through the real pipeline: load requests on ms:loadreq (what the activator writes),
the placement leader, the loaders' order streams, the runtimes, and the xDS server.

    .venv/bin/python -m bench.density [--registered 100000] [--loaded 20000] [--timeout 900]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import pct, write
from meshserve_testing import devmesh
from meshserve.store import State, keys, ops
from meshserve.store.messages import LoadRequest
from meshserve.model import ModelSpec

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode()


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (a loader runs its pod's runtime as a child)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants."""
    return round(sum(_rss_kib(p) for p in _tree(pid)) / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its live descendants."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for p in _tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def spec(i: int) -> ModelSpec:
    name = f"d{i:06d}"
    return ModelSpec(id=f"{name}__isvc-0000000000", alias=name, format="string",
                     storage={"parameters": {"type": "pvc", "name": "density"}, "path": "tiny.txt"}, size_hint=4096)


async def register(url: str, n: int) -> float:
    s = State.from_url(url)
    t0 = time.perf_counter()
    try:
        for start in range(0, n, 2000):
            await s.register_models([spec(i) for i in range(start, min(n, start + 2000))])
    finally:
        await s.close()
    return time.perf_counter() - t0


async def request_loads(url: str, ids: list[str]) -> None:
    s = State.from_url(url)
    try:
        for start in range(0, len(ids), 1000):
            async with s.r.pipeline(transaction=False) as p:
                for mid in ids[start:start + 1000]:
                    ops.queue_request(p, LoadRequest(mid))
                await p.execute()
    finally:
        await s.close()


async def count_loaded(url: str) -> int:
    s = State.from_url(url)
    try:
        raw = await s.r.hvals(keys.PLACEMENTS)
    finally:
        await s.close()
    return sum(1 for v in raw if b'"loaded"' in v)


async def not_loaded(url: str, ids: list[str], most: int = 30) -> list[dict[str, object]]:
    """Where the models that never loaded are stuck: their copies, their last decision, and
    whether a pod's load queue or orders stream still holds them (a run once left 19 of
    20,000 unloaded with nothing said about why)."""
    s = State.from_url(url)
    try:
        raw = await s.r.hgetall(keys.PLACEMENTS)
        stuck = [m for m in ids if b'"loaded"' not in raw.get(m.encode(), b"")]
        pods = [p.decode() for p in await s.r.hkeys(keys.PODS)]
        out: list[dict[str, object]] = []
        for m in stuck[:most]:
            queued = {p: await s.r.zscore(keys.loadq_key(p), m) for p in pods}
            decision = await s.r.hget(keys.DECISIONS, m)
            out.append({"model": m, "copies": (raw.get(m.encode()) or b"").decode(), "queued": {p: q for p, q in queued.items() if q is not None},
                        "decision": json.loads(decision) if decision else None})
        for p in pods:
            pending = await s.r.xpending(keys.orders_key(p), keys.ORDERS_GROUP)
            out.append({"pod": p, "orders_pending": pending.get("pending"), "orders_len": await s.r.xlen(keys.orders_key(p)),
                        "queue_len": await s.r.zcard(keys.loadq_key(p))})
        return [{"stuck": len(stuck)}, *out]
    finally:
        await s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registered", type=int, default=100_000)
    ap.add_argument("--loaded", type=int, default=20_000)
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between counts of the loaded models")
    ap.add_argument("--name", default="density", help="results file bench/results/<name>.json (a smaller trial run: another name)")
    ap.add_argument("--log", type=Path, help="keep the mesh's log here (for profiling and stuck loads)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config"
        cfg.mkdir()
        # Capacity: enough for every tiny model (each reserves its 4 KiB hint until measured).
        with devmesh.mesh(config_dir=cfg, pods=args.pods, pod_capacity_bytes=8 << 30) as m:
            d = m.data_dir / "pvc" / "density"
            d.mkdir(parents=True)
            (d / "tiny.txt").write_text("tiny")
            base_rss = {k: rss_mib(p) for k, p in m.pids().items()}
            reg_s = asyncio.run(register(m.redis_url, args.registered))
            print(f"registered {args.registered} in {reg_s:.1f}s", flush=True)
            ids = [spec(i).id for i in range(args.loaded)]
            cpu0 = {k: cpu_seconds(p) for k, p in m.pids().items()}
            t0 = time.monotonic()
            asyncio.run(request_loads(m.redis_url, ids))
            loaded, progress, rss_samples = 0, [], [{"loaded": 0, "rss_mib": base_rss}]
            while time.monotonic() - t0 < args.timeout:
                loaded = asyncio.run(count_loaded(m.redis_url))
                progress.append((round(time.monotonic() - t0, 1), loaded))
                # Memory as models come in, for the plot of memory against models loaded.
                rss_samples.append({"loaded": loaded, "rss_mib": {k: rss_mib(p) for k, p in m.pids().items()}})
                print(f"{progress[-1][0]:>7}s loaded {loaded}", flush=True)
                if loaded >= args.loaded:
                    break
                time.sleep(args.poll)
            all_loaded_s = time.monotonic() - t0 if loaded >= args.loaded else None
            # Where the loads' CPU went, per component (with its children), over the loading.
            cpu = {k: round(cpu_seconds(p) - cpu0.get(k, 0.0), 1) for k, p in m.pids().items()}
            load_avg = os.getloadavg()
            stuck = asyncio.run(not_loaded(m.redis_url, ids)) if loaded < args.loaded else []
            for line in stuck:
                print("not loaded:", json.dumps(line), flush=True)
            time.sleep(3)
            rss = {k: rss_mib(p) for k, p in m.pids().items()}
            lat, errors = [], 0
            for mid in random.sample(ids[: max(1, loaded)], min(args.samples, max(1, loaded))):
                alias = mid.split("__")[0]
                t1 = time.perf_counter()
                try:
                    with urllib.request.urlopen(urllib.request.Request(f"{m.rest}/v2/models/{alias}/infer", data=BODY, method="POST"), timeout=30) as r:
                        r.read()
                    lat.append((time.perf_counter() - t1) * 1000)
                except Exception:
                    errors += 1
            res = {
                "registered": args.registered,
                "loaded_target": args.loaded,
                "loaded": loaded,
                "pods": args.pods,
                "register_seconds": round(reg_s, 1),
                "all_loaded_seconds": round(all_loaded_s, 1) if all_loaded_s else None,
                "loads_per_second": round(loaded / all_loaded_s, 1) if all_loaded_s else None,
                "progress": progress,
                "not_loaded": stuck,
                "cpu_seconds_loading": cpu,
                "cpu_ms_per_load": {k: round(v * 1000 / max(1, loaded), 2) for k, v in cpu.items()},
                "load_average_after": [round(x, 1) for x in load_avg],
                "rss_mib_idle": base_rss,
                "rss_mib_loaded": rss,
                "rss_mib_total": round(sum(rss.values()), 1),
                "rss_samples": rss_samples + [{"loaded": loaded, "rss_mib": rss}],
                "latency_ms_random_loaded": {"n": len(lat), "errors": errors, "p50": round(pct(lat, 50), 2), "p99": round(pct(lat, 99), 2)},
            }
            if args.log:
                args.log.write_bytes(m.log_path.read_bytes())
            print(json.dumps(res, indent=2))
            print(write(args.name, res))


if __name__ == "__main__":
    main()
