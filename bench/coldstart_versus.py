"""Cold start (bench/coldstart.py), another checkout (the baseline) against this one, side by
side in one run: rounds alternate which goes first, each a fresh mesh in a fresh process, so
load on the shared machine hits both alike (as bench/xds_versus.py does for xDS).

    git -C /work/main archive <baseline> | tar -x -C /tmp/old-tree
    .venv/bin/python -m bench.coldstart_versus --baseline /tmp/old-tree --rounds 3 --models 30

Writes bench/results/coldstart_versus.json: each run's p50/p99 and the medians' ratio new/old.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO, write
from bench.xds_versus import tree_env

METRICS = ("cold_request_ms", "runtime_load_and_infer_ms", "overhead_ms")


def run_in(tree: Path, name: str, models: int) -> dict[str, Any]:
    out = f"coldstart_versus_{name}"
    done = subprocess.run([sys.executable, "-m", "bench.coldstart", "--models", str(models), "--out", out],
                          cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: bench.coldstart failed:\n{done.stderr[-3000:]}")
    res = json.loads((tree / "bench" / "results" / f"{out}.json").read_text())
    return {m: res[m] for m in METRICS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=int, default=30)
    args = ap.parse_args()
    trees = {"old": args.baseline.resolve(), "new": REPO}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for i in range(args.rounds):
        for name in (list(trees) if i % 2 == 0 else list(reversed(trees))):
            runs[name].append(run_in(trees[name], name, args.models))
            print(f"  {name}: {json.dumps(runs[name][-1])}", flush=True)
    med = {k: {m: {q: round(statistics.median(x[m][q] for x in v), 2) for q in ("p50", "p99")} for m in METRICS} for k, v in runs.items()}
    ratio = {m: {q: round(med["new"][m][q] / med["old"][m][q], 3) for q in ("p50", "p99")} for m in METRICS}
    doc = {"command": "python -m bench.coldstart_versus " + " ".join(sys.argv[1:]), "baseline": str(args.baseline),
           "models": args.models, "median_of_runs": med, "ratio_new_over_old": ratio, "runs": runs}
    print(json.dumps({"median_of_runs": med, "ratio_new_over_old": ratio}, indent=1))
    print(f"wrote {write('coldstart_versus', doc)}")


if __name__ == "__main__":
    main()
