"""`make bench`: every benchmark of issue 10, each bounded in time, one after another.

Each runs as its own process (a crash or a time-out in one does not stop the rest) and writes
its JSON to bench/results/; docs/benchmarks.md quotes them. Then bench.plots draws the figures
(bench/results/*.png) from that JSON. Run one or a few by name:

    .venv/bin/python -m bench.run                       # all, about 70 minutes on 2 cores
    .venv/bin/python -m bench.run gateway coldstart     # just these
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import REPO

# name -> (module arguments, time limit in seconds). Sizes are the issues' targets.
BENCHMARKS: dict[str, tuple[list[str], int]] = {
    "gateway": (["bench.gateway", "--seconds", "8"], 600),
    "density": (["bench.density", "--registered", "100000", "--loaded", "20000", "--timeout", "1200"], 1800),
    "convergence": (["bench.xds_e2e_latency", "--models", "20000", "--registered", "100000", "--changes", "100",
                     "--layout", "scoped", "--delta"], 1200),
    "scale_latency": (["bench.scale_latency"], 1800),
    "xds_build": (["bench.xds_build", "--sizes", "10000,100000", "--repeats", "5"], 900),
    "coldstart": (["bench.coldstart", "--models", "30"], 600),
    "up_rss": (["bench.up_rss"], 600),
    "peer_mlserver": (["bench.peer_mlserver", "--seconds", "8"], 1200),
    "placement_sim": (["bench.placement_sim"], 900),
    "placement_throughput": (["bench.placement_throughput"], 600),
    "xds_debounce": (["bench.xds_debounce"], 600),
    "churn": (["bench.churn", "--seconds", "90"], 900),
    "envoy_memory": (["bench.envoy_memory", "--models", "100000", "--variants", "prod"], 1200),
    "million": (["bench.million", "--registered", "1000000", "--loaded", "100000"], 1800),
    "pull": (["bench.pull", "--mib", "1024", "--repeats", "3"], 900),
    "adapters": (["bench.adapters"], 2400),
    "ort_threads": (["bench.ort_threads"], 300),
    "grpc_stream": (["bench.grpc_stream"], 600),
    # Installs Ray Serve in .venv-ray the first time (a few minutes); needs root for `unshare -n`.
    "peer_rayserve": (["bench.peer_rayserve"], 3000),
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        args, limit = BENCHMARKS[name]
        print(f"== {name} (at most {limit // 60} min)", flush=True)
        t0 = time.monotonic()
        try:
            code = subprocess.run([sys.executable, "-m", *args], cwd=REPO, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
        print(f"== {name}: {'ok' if code == 0 else code} in {time.monotonic() - t0:.0f}s", flush=True)
        if code != 0:
            failed.append(name)
    # The figures of docs/benchmarks.md, from whatever JSON is in bench/results now.
    print("== plots", flush=True)
    if subprocess.run([sys.executable, "-m", "bench.plots"], cwd=REPO, timeout=300).returncode != 0:
        failed.append("plots")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
