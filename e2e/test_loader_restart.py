"""A runtime process that dies in a running mesh is restarted by its loader agent, which reports
the lost model; placement drops the lost copy and the next requests load it again.

Kind: e2e. Real Valkey, Envoy, placement, loader agents and built-in runtimes (`meshserve up`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e


def _runtime_pid(data_dir: Path, index: int) -> int:
    """The built-in runtime of pod `index` in the mesh whose data dir is `data_dir`."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            env = (p / "environ").read_bytes()
        except OSError:
            continue
        if b"meshserve_loader.builtin" in cmd and str(index).encode() in cmd[-2:] and f"MESHSERVE_DATA_DIR={data_dir}".encode() in env:
            return int(p.name)
    raise LookupError(f"no runtime process for pod {index} of {data_dir}")


def _infer(m: devmesh.Mesh, fixtures: Path) -> tuple[str, dict]:
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{m.rest}/v2/models/sklearn-mnist/infer", "-d",
                          f"@{fixtures / 'mnist-request-proto-json.json'}", "-w", "\n%{http_code}", "--max-time", "60"],
                         capture_output=True, text=True, timeout=90)
    body, _, code = out.stdout.rpartition("\n")
    return code, json.loads(body) if body.strip().startswith("{") else {}


def test_runtime_killed_is_restarted_and_model_reloaded(fixtures: Path) -> None:
    with devmesh.mesh(pods=1) as m:
        code, body = _infer(m, fixtures)
        assert code == "200", body
        old = _runtime_pid(m.data_dir, 0)
        os.kill(old, signal.SIGKILL)
        r = redis.Redis.from_url(m.redis_url)
        try:
            ev = devmesh.wait_until(lambda: r.xrange("ms:pod-events"), 30, "runtime_restart event")
            f = ev[-1][1]
            assert f[b"op"] == b"runtime_restart" and json.loads(f[b"models"]) == [body["modelName"]], f
        finally:
            r.close()
        # Requests work again: the restarted runtime re-registers empty, placement re-places.
        deadline = time.monotonic() + 60
        while True:
            code, body = _infer(m, fixtures)
            if code == "200" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert code == "200", f"{body}\n{m.log()[-3000:]}"
        assert body["outputs"][0]["contents"]["int64Contents"] == ["8"]
        assert _runtime_pid(m.data_dir, 0) != old
        assert "runtime process exited with code -9" in m.log()
