"""Against a peer (issue 10, item 5): MLServer alone against MLServer behind meshserve.

The same sklearn digits SVM, the same client (`hey`, rate-limited), the same run. Side A is a
standalone MLServer 1.7.1 (its own multi-model serving, the model loaded through its repository
API). Side B is a mesh whose only runtime pod runs MLServer 1.7.1 from the same venv, reached
through the Envoy gateway. The two sides alternate at each rate, so machine noise hits both.

    .venv/bin/python -m bench.peer_mlserver [--seconds 8] [--rates 40,100,200]

Writes bench/results/peer_mlserver.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from bench.common import REPO, hey, install_hey, write
from meshserve_testing import devmesh
from meshserve_loader.example_models import write_sklearn
from meshserve_loader.servers.mlserver import MLServerClient
from meshserve_loader.servers.mlserver_venv import ensure_mlserver
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers.mlserver import start_mlserver

FIXTURES = REPO.parent / "shared" / "fixtures"
MODEL_ID = "sklearn-mnist__isvc-standalone"
JSON_CT = "Content-Type: application/json"


async def _standalone(exe: Path, tmp: Path) -> tuple[RuntimeProcess, str]:
    proc, url, models = await start_mlserver(exe, tmp)
    async with aiohttp.ClientSession() as s:
        c = MLServerClient(url, s, models, pid=lambda: proc.pid)
        await c.wait_ready(180)
        await c.load(MODEL_ID, {"path": str(write_sklearn(tmp / "mnist-svm.joblib")), "format": "sklearn"}, 120)
    return proc, url


def _stop(pid: int, grace: float = 20) -> None:
    """SIGTERM its process group, then SIGKILL; reaped here because the runtime process was
    started on another (finished) event loop."""
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:  # already reaped by asyncio's child watcher
                return
            time.sleep(0.1)


def _config(tmp: Path) -> Path:
    d = tmp / "mesh-config"
    d.mkdir()
    shutil.copy(REPO / "mesh-config" / "sklearn-mnist.yaml", d / "sklearn-mnist.yaml")
    shutil.copy(REPO / "mesh-config" / "examples" / "runtimes" / "mlserver.yaml", d / "mlserver.yaml")
    return d


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=180) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rates", default="40,100,200")
    args = ap.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    install_hey()
    exe = ensure_mlserver(REPO)
    body_path = FIXTURES / "mnist-request-v2-rest.json"
    body = body_path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        proc, direct = asyncio.run(_standalone(exe, tmpd))
        try:
            with devmesh.mesh(config_dir=_config(tmpd), pods=1, pod_runtimes="mlserver-1.x", timeout=300) as mesh:
                gw = f"{mesh.rest}/v2/models/sklearn-mnist/infer"
                assert _post(gw, body)["outputs"][0]["data"] == [8]  # cold: loads on MLServer
                devmesh.wait_until(lambda: b"/v2/models/sklearn-mnist" in devmesh.http_get(f"{mesh.admin}/config_dump")[1], 30, "route")
                assert _post(f"{direct}/v2/models/{MODEL_ID}/infer", body)["outputs"][0]["data"] == [8]
                rows = []
                for rps in rates:
                    for side, url in (("mlserver", f"{direct}/v2/models/{MODEL_ID}/infer"), ("meshserve", gw)):
                        r = hey(url, body_path, rps, args.seconds, headers=(JSON_CT,))
                        r["path"] = side
                        rows.append(r)
                        print(json.dumps(r), flush=True)
        finally:
            _stop(proc.pid)
    summary = []
    for rps in rates:
        a = next(r for r in rows if r["target_rps"] == rps and r["path"] == "mlserver")
        b = next(r for r in rows if r["target_rps"] == rps and r["path"] == "meshserve")
        summary.append({
            "rps": rps,
            "p50_ratio": round(b["p50_ms"] / a["p50_ms"], 3) if a["p50_ms"] else None,
            "p99_ratio": round(b["p99_ms"] / a["p99_ms"], 3) if a["p99_ms"] else None,
            "p50_overhead_ms": round(b["p50_ms"] - a["p50_ms"], 3),
            "errors": {"mlserver": a["errors"], "meshserve": b["errors"]},
        })
    p = write("peer_mlserver", {"seconds_per_point": args.seconds, "client": "hey (Go), 20 workers, rate-limited",
                                "model": "sklearn SVC(gamma=0.001) on load_digits, v2 REST form", "rows": rows, "summary": summary})
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
