"""Gateway overhead against the physical limit (issue 10, item 1).

Same tiny model, same client (`hey`), same run: through the Envoy gateway and straight to the
runtime pod, interleaved at each rate and repeated, so machine noise hits both sides alike; the
medians over repeats are reported. A short warm-up on each side is not recorded.

    .venv/bin/python -m bench.gateway [--seconds 10] [--rates 200,500,1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import urllib.request
from pathlib import Path

from bench.common import hey, install_hey, string_model_mesh, write
from meshserve.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rates", default="200,500,1000")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every point; medians are reported")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    install_hey()
    with tempfile.TemporaryDirectory() as tmp, string_model_mesh(Path(tmp), ["tiny"]) as mesh:
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}))
        req = urllib.request.Request(f"{mesh.rest}/v2/models/tiny/infer", data=body.read_bytes(), method="POST")
        model_id = json.loads(urllib.request.urlopen(req, timeout=60).read())["model_name"]
        import time

        time.sleep(1.0)  # let the route reach the gateway
        # Which pod holds it: ask the gateway's own config via the runtime's table.
        direct = None
        for i in range(2):
            with urllib.request.urlopen(mesh.pod_rest(i) + "/v2/meshserve/stats", timeout=5) as r:
                if model_id in json.loads(r.read()):
                    direct = mesh.pod_rest(i)
        assert direct, "model not found on any pod"
        sides = (("direct", f"{direct}/v2/models/{model_id}/infer"), ("gateway", f"{mesh.rest}/v2/models/tiny/infer"))
        for _, url in sides:  # warm-up, not recorded: connection pools, caches, the first pushes
            hey(url, body, rates[0], 2)
        rows = []
        for rep in range(args.repeats):
            for rps in rates:
                for side, url in (sides if rep % 2 == 0 else sides[::-1]):
                    r = hey(url, body, rps, args.seconds)
                    r.update(path=side, repeat=rep)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        summary = []
        for rps in rates:
            d = {k: statistics.median(r[k] for r in rows if r["target_rps"] == rps and r["path"] == "direct") for k in ("p50_ms", "p99_ms")}
            g = {k: statistics.median(r[k] for r in rows if r["target_rps"] == rps and r["path"] == "gateway") for k in ("p50_ms", "p99_ms")}
            summary.append({
                "rps": rps,
                "direct_p50_ms": d["p50_ms"], "direct_p99_ms": d["p99_ms"],
                "gateway_p50_ms": g["p50_ms"], "gateway_p99_ms": g["p99_ms"],
                "p50_overhead_ms": round(g["p50_ms"] - d["p50_ms"], 3),
                "p99_overhead_ms": round(g["p99_ms"] - d["p99_ms"], 3),
                "errors": sum(r["errors"] for r in rows if r["target_rps"] == rps),
                "target_p99_overhead_le_1ms": g["p99_ms"] <= d["p99_ms"] + 1.0,
                "target_p99_lt_10ms": g["p99_ms"] < 10.0,
            })
        p = write("gateway", {"seconds_per_point": args.seconds, "repeats": args.repeats, "envoy_concurrency": Settings.from_env().envoy_concurrency,
                              "client": "hey (Go), 20 workers, rate-limited", "statistic": "median over repeats of each point's p50/p99",
                              "rows": rows, "summary": summary})
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
