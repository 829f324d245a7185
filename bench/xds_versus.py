"""The xDS benchmarks of docs/benchmarks.md, another checkout (the baseline, e.g. main's code)
against this one, side by side in one run: rounds alternate which goes first, each measurement
in a fresh process, so load on the shared machine hits both alike.

- `build`: a full build of the scoped layout, as production does it (bench/xds_build.py's
  worker, templates path): build plus packing into the snapshot cache, wall and CPU seconds.
- `convergence`: bench/xds_e2e_latency.py (a placement commit to the real Envoy routing to the
  new pod), its p50/p99.

    git -C /work/main archive main | tar -x -C /tmp/main-tree
    .venv/bin/python -m bench.xds_versus --baseline /tmp/main-tree build --sizes 10000,100000 --rounds 5
    .venv/bin/python -m bench.xds_versus --baseline /tmp/main-tree convergence --rounds 2

Writes bench/results/xds_versus.json. The baseline runs with its own `meshserve` and
components first on PYTHONPATH, in this venv (`tree_env`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO, write


def tree_env(tree: Path) -> dict[str, str]:
    """This venv, with `tree`'s own kernel and every component folder of it first on the path
    (the processes a mesh starts inherit it, so they run that tree's code too)."""
    folders = sorted({str(p.parent) for p in tree.glob("*/meshserve_*") if p.is_dir()})
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*folders, str(tree)]))


def run_in(tree: Path, args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", *args], cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def alternate(trees: dict[str, Path], args: list[str], rounds: int, timeout: float) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for i in range(rounds):
        for name in (list(trees) if i % 2 == 0 else list(reversed(trees))):
            runs[name].append(run_in(trees[name], args, timeout))
            print(f"  {name} {' '.join(args[:1] + args[2:])}: {_brief(runs[name][-1])}", flush=True)
    return runs


def _brief(x: dict[str, Any]) -> str:
    if "total_s" in x:
        return f"{x['total_s']:.3f} s (cpu {x['total_cpu_s']:.3f})"
    return f"p50 {x.get('p50_ms')} ms, p99 {x.get('p99_ms')} ms, Envoy {x.get('envoy_rss_mib')} MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("what", choices=["build", "convergence"])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    trees = {"old": args.baseline.resolve(), "new": REPO}
    results = []
    if args.what == "build":
        for n in (int(x) for x in args.sizes.split(",")):
            runs = alternate(trees, ["bench.xds_build", "--worker", "new", str(n), str(n // 5)], args.rounds, 1200)
            med = {k: {m: round(statistics.median(x[m] for x in v), 3) for m in ("total_s", "total_cpu_s", "build_s", "pack_s")} for k, v in runs.items()}
            # Listeners differ on purpose (the Lua scripts share one field reader now); every other type must match.
            same = all(x["versions"][t] == runs["old"][0]["versions"][t] for v in runs.values() for x in v for t in x["versions"] if t != "Listener")
            results.append({"what": "build", "registered": n, "loaded": n // 5, "median": med, "runs_total_s": {k: [round(x["total_s"], 3) for x in v] for k, v in runs.items()},
                            "ratio_new_over_old_total": round(med["new"]["total_s"] / med["old"]["total_s"], 3),
                            "ratio_new_over_old_cpu": round(med["new"]["total_cpu_s"] / med["old"]["total_cpu_s"], 3),
                            "same_versions_but_listeners": same})
            print(json.dumps(results[-1]), flush=True)
    else:
        cmd = ["bench.xds_e2e_latency", "--models", "20000", "--registered", "100000", "--changes", "100", "--layout", "scoped", "--delta"]
        runs = alternate(trees, cmd, args.rounds, 3600)
        med = {k: {m: statistics.median(x[m] for x in v if x.get(m) is not None) for m in ("p50_ms", "p99_ms", "envoy_rss_mib")} for k, v in runs.items()}
        results.append({"what": "convergence", "command": " ".join(cmd), "median": med,
                        "runs": {k: [{m: x.get(m) for m in ("p50_ms", "p99_ms", "max_ms", "envoy_rss_mib")} for x in v] for k, v in runs.items()},
                        "ratio_new_over_old_p50": round(med["new"]["p50_ms"] / med["old"]["p50_ms"], 3),
                        "ratio_new_over_old_p99": round(med["new"]["p99_ms"] / med["old"]["p99_ms"], 3)})
        print(json.dumps(results[-1]), flush=True)
    prev = {}
    p = REPO / "bench" / "results" / "xds_versus.json"
    if p.exists():
        prev = json.loads(p.read_text()).get("by_what", {})
    prev[args.what] = results
    print(f"wrote {write('xds_versus', {'command': 'python -m bench.xds_versus ' + ' '.join(sys.argv[1:]), 'baseline': str(args.baseline), 'by_what': prev})}")


if __name__ == "__main__":
    main()
