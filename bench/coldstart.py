"""Cold start (issue 10, item 4): a request for an unloaded model, minus the runtime's own load time.

For each model: time a request through the gateway for a model no pod holds (activator, placement
decision, order, loader, runtime load, event, forward), and, side by side, time the same runtime
loading an identical scratch model directly through its repository API and answering once. The
difference is meshserve's overhead.

    .venv/bin/python -m bench.coldstart [--models 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import hops
from bench.common import pct, string_model_mesh, write

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode()


def post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--hops", action="store_true", help="also time each hop from the components' trace spans (bench/hops.py)")
    ap.add_argument("--out", default="coldstart", help="result name under bench/results/")
    args = ap.parse_args()
    names = [f"cold{i}" for i in range(args.models)]
    collector = hops.Collector() if args.hops else None
    with tempfile.TemporaryDirectory() as tmp, string_model_mesh(Path(tmp), names) as mesh:
        scratch = mesh.data_dir / "pvc" / "bench"
        total, direct, overhead = [], [], []
        post(f"{mesh.rest}/v2/models/{names[0]}/infer", BODY)  # warm the path once; not counted
        for n in names[1:]:
            t0 = time.perf_counter()
            out = post(f"{mesh.rest}/v2/models/{n}/infer", BODY)
            cold = time.perf_counter() - t0
            assert out["outputs"][0]["data"] == [f"hello from {n}"], out
            pod, control = mesh.pod_rest(len(total) % 2), mesh.pod_control(len(total) % 2)
            t0 = time.perf_counter()
            post(f"{control}/v2/repository/models/scratch-{n}/load", json.dumps({"parameters": {"path": str(scratch / f"{n}.txt"), "format": "string"}}).encode())
            post(f"{pod}/v2/models/scratch-{n}/infer", BODY)
            d = time.perf_counter() - t0
            post(f"{control}/v2/repository/models/scratch-{n}/unload", b"{}")
            total.append(cold * 1000)
            direct.append(d * 1000)
            overhead.append((cold - d) * 1000)
        res = {
            "models": len(total),
            "cold_request_ms": {"p50": round(pct(total, 50), 2), "p99": round(pct(total, 99), 2)},
            "runtime_load_and_infer_ms": {"p50": round(pct(direct, 50), 2), "p99": round(pct(direct, 99), 2)},
            "overhead_ms": {"p50": round(pct(overhead, 50), 2), "p99": round(pct(overhead, 99), 2)},
            "target_p50_overhead_le_50ms": pct(overhead, 50) <= 50,
            # Every sample, for the distribution plot (bench/plots.py).
            "samples_ms": {"cold_request": [round(x, 2) for x in total], "runtime_load_and_infer": [round(x, 2) for x in direct],
                           "overhead": [round(x, 2) for x in overhead]},
        }
        if collector is not None:
            time.sleep(1.5)  # the processes export every 200 ms
            res["hops_ms"] = hops.hops(collector.spans, set(names[1:]))
            collector.close()
        print(json.dumps(res, indent=2))
        print(write(args.out, res))


if __name__ == "__main__":
    main()
