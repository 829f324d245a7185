"""Does a runtime load hold up inference on the same pod? (issue 19 §3: "the hot path must not
queue behind loads")

One pod (`meshserve up`, the built-in runtime). A probe sends the example model (the digits
SVM) one request at a time at a steady rate straight to the pod, first alone, then while the
same runtime loads and unloads scratch copies of the model back to back through its
repository API (the loader's path, without placement). Loads run on a thread of their own and
inference on the inference threads; what they share is the process's GIL and the cores.

    .venv/bin/python -m bench.hotpath [--seconds 15] [--rps 20] [--load-rate 10]    # -> bench/results/hotpath.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench import churn
from bench.common import pct, write


def _post(url: str, body: bytes, timeout: float = 60) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=timeout) as r:
        return r.read()


def probe(url: str, seconds: float, rps: float) -> list[float]:
    ms: list[float] = []
    nxt, end = time.monotonic(), time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        _post(url, churn.BODY)
        ms.append((time.perf_counter() - t0) * 1000)
        nxt += 1.0 / rps
        time.sleep(max(0.0, nxt - time.monotonic()))
    return ms


def churn_loads(control: str, path: Path, stop: threading.Event, out: list[float], rate: float = 0.0) -> None:
    i = 0
    nxt = time.monotonic()
    while not stop.is_set():
        if rate:
            nxt += 1.0 / rate
            time.sleep(max(0.0, nxt - time.monotonic()))
        name = f"scratch-{i}"
        t0 = time.perf_counter()
        _post(f"{control}/v2/repository/models/{name}/load", json.dumps({"parameters": {"path": str(path), "format": "sklearn"}}).encode())
        out.append((time.perf_counter() - t0) * 1000)
        _post(f"{control}/v2/repository/models/{name}/unload", b"{}")
        i += 1


def stats(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50": round(pct(ms, 50), 2), "p99": round(pct(ms, 99), 2), "max": round(max(ms, default=0), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rps", type=float, default=20.0)
    ap.add_argument("--load-rate", type=float, default=0.0, help="loads per second (0: back to back); the issue's churn ran ~9 per pod")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ms-hot-") as tmp, churn.churn_mesh(Path(tmp), 2, 10, pods=1) as (mesh, names):
        _post(f"{mesh.rest}/v2/models/{names[0]}/infer", churn.BODY, 120)  # placement loads it
        model_id = json.loads(_post(f"{mesh.rest}/v2/models/{names[0]}/infer", churn.BODY))["model_name"]
        url = f"{mesh.pod_rest(0)}/v2/models/{model_id}/infer"
        path = next((mesh.data_dir / "pvc").rglob("mnist-svm.joblib"))
        probe(url, 2.0, args.rps)  # warm-up, not counted
        alone = probe(url, args.seconds, args.rps)
        stop, loads = threading.Event(), []
        t = threading.Thread(target=churn_loads, args=(mesh.pod_control(0), path, stop, loads, args.load_rate), daemon=True)
        t.start()
        during = probe(url, args.seconds, args.rps)
        stop.set()
        t.join()
        again = probe(url, args.seconds, args.rps)
    res = {"probe_rps": args.rps, "load_rate": args.load_rate or "back to back", "seconds": args.seconds, "alone_ms": stats(alone), "during_loads_ms": stats(during),
           "alone_after_ms": stats(again), "loads": len(loads), "load_ms": stats(loads),
           "loads_per_second": round(len(loads) / args.seconds, 1)}
    print(json.dumps(res, indent=2))
    print(write("hotpath", res))


if __name__ == "__main__":
    main()
