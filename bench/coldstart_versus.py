"""Cold start (bench/coldstart.py), another checkout (the baseline) against this one, side by
side in one run: rounds alternate which goes first, each a fresh mesh in a fresh process, so
load on the shared machine hits both alike (as bench/xds_versus.py does for xDS).

    git -C /work/main archive <baseline> | tar -x -C /tmp/old-tree
    .venv/bin/python -m bench.coldstart_versus --baseline /tmp/old-tree --rounds 3 --models 30
    .venv/bin/python -m bench.coldstart_versus --baseline /tmp/old-tree --bench adapters --models 30

Writes bench/results/coldstart_versus[_adapters].json: each run's p50/p99 and the medians'
ratio new/old. `--bench adapters` compares the cold start of LoRA adapters whose base is
resident (bench/adapters.py --cold-only --hops) instead of the tiny models of bench/coldstart.py.
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

# bench -> (its command line but the count and output, the figures compared)
BENCHES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "coldstart": (["bench.coldstart", "--hops", "--models"], ("cold_request_ms", "runtime_load_and_infer_ms", "overhead_ms")),
    "adapters": (["bench.adapters", "--cold-only", "--hops", "--pairs", "30", "--cold"],
                 ("cold_request_ms", "runtime_load_ms", "runtime_first_embed_ms", "overhead_ms")),
}


def run_in(tree: Path, name: str, models: int, bench: str = "coldstart") -> dict[str, Any]:
    argv, metrics = BENCHES[bench]
    out = f"coldstart_versus_{bench}_{name}"
    done = subprocess.run([sys.executable, "-m", *argv, str(models), "--out", out],
                          cwd=tree, env=tree_env(tree), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {argv[0]} failed:\n{done.stderr[-3000:]}")
    res = json.loads((tree / "bench" / "results" / f"{out}.json").read_text())
    res = res.get("cold_start", res)  # bench.adapters nests its cold-start figures
    got = {m: res[m] for m in metrics}
    if "hops_ms" in res:
        got["hops_p50"] = {h: v["p50"] for h, v in res["hops_ms"].items()}
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--bench", choices=sorted(BENCHES), default="coldstart")
    args = ap.parse_args()
    metrics = BENCHES[args.bench][1]
    trees = {"old": args.baseline.resolve(), "new": REPO}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for i in range(args.rounds):
        for name in (list(trees) if i % 2 == 0 else list(reversed(trees))):
            runs[name].append(run_in(trees[name], name, args.models, args.bench))
            print(f"  {name}: {json.dumps(runs[name][-1])}", flush=True)
    med = {k: {m: {q: round(statistics.median(x[m][q] for x in v), 2) for q in ("p50", "p99")} for m in metrics} for k, v in runs.items()}
    ratio = {m: {q: round(med["new"][m][q] / med["old"][m][q], 3) for q in ("p50", "p99")} for m in metrics}
    hops = {k: {h: round(statistics.median(x["hops_p50"][h] for x in v if h in x.get("hops_p50", {})), 2)
                for h in (v[0].get("hops_p50") or {})} for k, v in runs.items()}
    doc = {"command": "python -m bench.coldstart_versus " + " ".join(sys.argv[1:]), "baseline": str(args.baseline),
           "models": args.models, "median_of_runs": med, "ratio_new_over_old": ratio, "hops_p50_median": hops, "runs": runs}
    print(json.dumps({"median_of_runs": med, "ratio_new_over_old": ratio, "hops_p50_median": hops}, indent=1))
    name = "coldstart_versus" if args.bench == "coldstart" else f"coldstart_versus_{args.bench}"
    print(f"wrote {write(name, doc)}")


if __name__ == "__main__":
    main()
