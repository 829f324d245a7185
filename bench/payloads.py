"""What ModelMesh's payload processors (MM_PAYLOAD_PROCESSORS) cost a request: two built-in
runtime processes side by side, one sending every inference's payloads to an HTTP processor on
this machine, one without, the same digits SVM request to each alternately (which goes first
alternates too), one at a time, each over its own keep-alive connection, for REST and gRPC.

    .venv/bin/python -m bench.payloads [--pairs 1000]    # ~1 min -> bench/results/payloads.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import pct, write
from meshserve_loader.example_models import write_sklearn
from meshserve_testing.payload_processor import recording_processor

MODEL = "mnist__isvc-0000000001"
PIXELS = [0.0, 0.0, 1.0, 11.0, 14.0, 15.0, 3.0, 0.0, 0.0, 1.0, 13.0, 16.0, 12.0, 16.0, 8.0, 0.0, 0.0, 8.0, 16.0, 4.0, 6.0, 16.0,
          5.0, 0.0, 0.0, 5.0, 15.0, 11.0, 13.0, 14.0, 0.0, 0.0, 0.0, 0.0, 2.0, 12.0, 16.0, 13.0, 0.0, 0.0, 0.0, 0.0, 0.0, 13.0,
          16.0, 16.0, 6.0, 0.0, 0.0, 0.0, 0.0, 16.0, 16.0, 16.0, 7.0, 0.0, 0.0, 0.0, 0.0, 11.0, 13.0, 12.0, 1.0, 0.0]


def _runtime(d: Path, model: Path, processors: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = d / "ports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "MM_"))}
    env.update({"MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_DATA_DIR": str(d / "data"),
                "MESHSERVE_MODEL_ROOTS": str(model.parent), "MESHSERVE_LOG_LEVEL": "warning", "MM_PAYLOAD_PROCESSORS": processors})
    p = subprocess.Popen([sys.executable, "-m", "meshserve_loader.builtin", "--index", "0", "--ports-file", str(ports)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ports.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the runtime did not start")
        time.sleep(0.05)
    bound = json.loads(ports.read_text())
    c = http.client.HTTPConnection("127.0.0.1", bound["control"], timeout=60)
    c.request("POST", f"/v2/repository/models/{MODEL}/load", json.dumps({"parameters": {"path": str(model), "format": "sklearn"}}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    c.close()
    return p, bound


def _rest(bounds: dict[str, dict[str, int]], pairs: int) -> dict[str, list[float]]:
    body = json.dumps({"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": PIXELS}]}).encode()
    conns = {s: http.client.HTTPConnection("127.0.0.1", b["rest"], timeout=60) for s, b in bounds.items()}
    ms: dict[str, list[float]] = {s: [] for s in bounds}
    for k in range(pairs + 50):
        for s in (("off", "on") if k % 2 else ("on", "off")):
            t0 = time.perf_counter()
            conns[s].request("POST", f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
            r = conns[s].getresponse()
            r.read()
            assert r.status == 200
            if k >= 50:
                ms[s].append((time.perf_counter() - t0) * 1000)
    for c in conns.values():
        c.close()
    return ms


def _grpc(bounds: dict[str, dict[str, int]], pairs: int) -> dict[str, list[float]]:
    import grpc

    from meshserve_proto import grpc_predict_v2_pb2 as pb
    from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="predict", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(PIXELS)
    chans = {s: grpc.insecure_channel(f"127.0.0.1:{b['grpc']}") for s, b in bounds.items()}
    stubs = {s: pbg.GRPCInferenceServiceStub(c) for s, c in chans.items()}
    ms: dict[str, list[float]] = {s: [] for s in bounds}
    for k in range(pairs + 50):
        for s in (("off", "on") if k % 2 else ("on", "off")):
            t0 = time.perf_counter()
            stubs[s].ModelInfer(req, timeout=60)
            if k >= 50:
                ms[s].append((time.perf_counter() - t0) * 1000)
    for c in chans.values():
        c.close()
    return ms


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1000, help="requests per side and transport (after 50 not counted)")
    ap.add_argument("--out", default="payloads", help="result name under bench/results/; empty: write nothing")
    args = ap.parse_args(argv)
    procs = []
    res: dict[str, Any] = {"params": vars(args), "load_average_start": os.getloadavg()}
    with recording_processor() as (got, url), tempfile.TemporaryDirectory(prefix="bench-payloads-") as tmp:
        try:
            d = Path(tmp)
            model = write_sklearn(d / "models" / "mnist-svm.joblib")
            bounds = {}
            for side, processors in (("on", url), ("off", "")):
                (d / side).mkdir()
                p, bounds[side] = _runtime(d / side, model, processors)
                procs.append(p)
            for name, run in (("rest", _rest), ("grpc", _grpc)):
                ms = run(bounds, args.pairs)
                on, off = pct(ms["on"], 50), pct(ms["off"], 50)
                res[name] = {"on_p50_ms": round(on, 3), "off_p50_ms": round(off, 3), "p50_ratio_on_over_off": round(on / off, 3),
                             "on_p99_ms": round(pct(ms["on"], 99), 3), "off_p99_ms": round(pct(ms["off"], 99), 3)}
            time.sleep(1.0)
            res["payloads_received"] = len(got)
            res["payloads_expected"] = 2 * 2 * (args.pairs + 50)
        finally:
            for p in procs:
                p.terminate()
                p.wait(20)
    res["load_average_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.out:
        print(write(args.out, res))
    return res


if __name__ == "__main__":
    main()
