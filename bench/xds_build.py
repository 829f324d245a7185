"""Full build of the scoped layout: building and packing every resource (issue 3, target 1 s at
100,000 registered models). Old path against new path, side by side in one run.

- old: `scoped.build_all(state, listeners, wire=False)`: every scope and RouteConfiguration
  built as protobuf messages, then packed by the cache (the path before fastpb).
- new: `scoped.build_all(state, listeners)`: scopes and loaded models' RouteConfigurations
  rendered from templates (meshserve_xds/fastpb.py), packed from their bytes.

Each measurement is `build_all` plus `SnapshotCache.set` (packing into Anys, per-resource digests,
type versions): what a full resync costs the control plane. It runs in a fresh process (the
heap, and so the garbage collector's work, is the same for both paths), with old and new
alternating, so load on the shared machine hits both alike. Reported per path: wall seconds,
CPU seconds (less disturbed by other processes), the full collection the process runs
afterwards (`gc_after_s`: work the collector was left with, not hidden), and the memory the
snapshot holds once the build is dropped (`snapshot_rss_mib`, RSS growth). Both paths must
give the same digest for every resource, which is checked.

Shapes (4 pods, one alias per model):
- `registered`: N registered models, N/5 of them loaded (the issue's 100,000 / 20,000);
- `loaded`: N models, all loaded (the shape of routing.md's srds rows: 6.9 s at 100,000).

    .venv/bin/python -m bench.xds_build --sizes 10000,100000 --repeats 5

Writes bench/results/xds_build.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.common import REPO, write
from meshserve_xds import resources as r
from meshserve_xds import scoped
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import GATEWAY_GROUP

PODS = 4


def model_id(i: int) -> str:
    return f"m{i}__isvc-{i:010x}"


def routing_state(registered: int, loaded: int) -> r.RoutingState:
    pods = {f"pod-{k}": r.Endpoint("10.0.0.%d" % (k + 1), 8008, 8033) for k in range(PODS)}
    names = sorted(pods)
    return r.RoutingState(
        pods=pods,
        loaded={model_id(i): [names[i % PODS]] for i in range(loaded)},
        aliases={f"m{i}": model_id(i) for i in range(registered)},
        registered={model_id(i) for i in range(registered)},
        activator=r.Endpoint("10.0.1.1", 8080, 8081),
    )


def worker(path: str, registered: int, loaded: int) -> dict[str, Any]:
    state = routing_state(registered, loaded)
    listeners = r.ListenerConfig()
    gc.collect()
    rss0 = _rss_mib()
    cache = SnapshotCache()
    w0, c0 = time.perf_counter(), time.process_time()
    res = scoped.build_all(state, listeners, wire=(path == "new"))
    w1 = time.perf_counter()
    cache.set(GATEWAY_GROUP, res)
    w2, c2 = time.perf_counter(), time.process_time()
    gc.collect()
    w3 = time.perf_counter()
    del res
    gc.collect()
    held = _rss_mib() - rss0
    g = cache.group(GATEWAY_GROUP)
    fp = hashlib.blake2b(digest_size=16)
    for t in sorted(g.types):
        for n in sorted(g.types[t].digests):
            fp.update(f"{t}\0{n}\0".encode() + g.types[t].digests[n])
    return {
        "build_s": w1 - w0, "pack_s": w2 - w1, "total_s": w2 - w0, "total_cpu_s": c2 - c0, "gc_after_s": w3 - w2,
        "resources": {t.rsplit(".", 1)[-1]: len(ts.digests) for t, ts in g.types.items()},
        "snapshot_rss_mib": round(held, 1),
        "config_bytes": sum(len(b) for ts in g.types.values() for b in ts.resources.values()),
        "versions": {t.rsplit(".", 1)[-1]: ts.version for t, ts in g.types.items()},
        "fingerprint": fp.hexdigest(),
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def run_one(path: str, registered: int, loaded: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.xds_build", "--worker", path, str(registered), str(loaded)],
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(f"worker {path} {registered}/{loaded} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("build_s", "pack_s", "total_s", "total_cpu_s", "gc_after_s")
    return {
        **{f"median_{k}": round(statistics.median(x[k] for x in runs), 3) for k in keys},
        "median_snapshot_rss_mib": round(statistics.median(x["snapshot_rss_mib"] for x in runs), 1),
        "min_total_s": round(min(x["total_s"] for x in runs), 3),
        "max_total_s": round(max(x["total_s"] for x in runs), 3),
        "runs_total_s": [round(x["total_s"], 3) for x in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--shapes", default="registered,loaded", help="registered (N/5 loaded), loaded (all N loaded)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", nargs=3, metavar=("PATH", "REGISTERED", "LOADED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    results = []
    for shape in args.shapes.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            registered, loaded = (n, n // 5) if shape == "registered" else (n, n)
            runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for i in range(args.repeats):
                for path in (("old", "new") if i % 2 == 0 else ("new", "old")):
                    runs[path].append(run_one(path, registered, loaded))
                    x = runs[path][-1]
                    print(f"  {shape} {registered}/{loaded} {path}: {x['total_s']:.3f}s (build {x['build_s']:.3f} + pack "
                          f"{x['pack_s']:.3f}; cpu {x['total_cpu_s']:.3f}; gc after {x['gc_after_s']:.3f})", flush=True)
            fps = {x["fingerprint"] for p in runs.values() for x in p}
            old, new = _summary(runs["old"]), _summary(runs["new"])
            entry = {
                "shape": shape, "registered": registered, "loaded": loaded, "aliases": registered, "pods": PODS,
                "resources": runs["new"][0]["resources"], "config_bytes": runs["new"][0]["config_bytes"],
                "identical_digests": len(fps) == 1,
                "old": old, "new": new,
                "speedup_median_total": round(old["median_total_s"] / new["median_total_s"], 2),
                "speedup_median_cpu": round(old["median_total_cpu_s"] / new["median_total_cpu_s"], 2),
            }
            results.append(entry)
            print(f"{shape} {registered}/{loaded}: old {old['median_total_s']}s, new {new['median_total_s']}s "
                  f"(x{entry['speedup_median_total']}), identical digests: {entry['identical_digests']}", flush=True)
    p = write("xds_build", {"command": "python -m bench.xds_build " + " ".join(a for a in sys.argv[1:]), "results": results})
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
