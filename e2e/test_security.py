"""Issue 9, security defaults: Redis AUTH works end to end, and credentials never appear in
logs, metrics or debug output; admin and debug endpoints listen on loopback only.

Kind: e2e. A real Valkey with requirepass, a real mesh pointed at it by URL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e
SECRET = "s3cr3t-Pa55word-7f1c"


def test_redis_auth_and_no_credential_leaks(fixtures: Path) -> None:
    with devmesh.valkey(password=SECRET) as v, devmesh.mesh(pods=1, redis_url=v.url) as m:
        body = (fixtures / "mnist-request-proto-json.json").read_bytes()
        out = json.loads(urllib.request.urlopen(urllib.request.Request(f"{m.rest}/v2/models/sklearn-mnist/infer", data=body, method="POST"), timeout=120).read())
        assert out["outputs"][0]["contents"]["int64Contents"] == ["8"]
        surfaces = {
            "mesh log": m.log(),
            "xds debug": devmesh.http_get(f"http://127.0.0.1:{m.ports['xds_debug_port']}/debug/config")[1].decode(),
            "xds metrics": devmesh.http_get(f"http://127.0.0.1:{m.ports['xds_debug_port']}/metrics")[1].decode(),
            "placement metrics": devmesh.http_get(f"http://127.0.0.1:{m.ports['placement_metrics_port']}/metrics")[1].decode(),
            "runtime metrics": devmesh.http_get(m.pod_rest(0) + "/metrics")[1].decode(),
            "envoy config": devmesh.http_get(f"{m.admin}/config_dump")[1].decode(),
        }
        status = subprocess.run(
            [__import__("sys").executable, "-m", "meshserve.cli", "status", "--json", "--redis-url", v.url], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stderr
        surfaces["status --json"] = status.stdout + status.stderr
        leaked = [name for name, text in surfaces.items() if SECRET in text]
        assert leaked == []


def test_wrong_password_is_a_clear_error() -> None:
    with devmesh.valkey(password=SECRET) as v:
        bad = v.url.replace(SECRET, "wrong")
        # Every command that reads the mesh's Redis says it cannot, without echoing the password.
        for cmd in (["status"], ["get", "rules"], ["explain", "sklearn-mnist"], ["load", "sklearn-mnist"]):
            out = subprocess.run([__import__("sys").executable, "-m", "meshserve.cli", *cmd, "--redis-url", bad], capture_output=True, text=True, timeout=60)
            assert out.returncode != 0, cmd
            assert "Redis" in out.stderr and SECRET not in out.stderr and "wrong" not in out.stderr, (cmd, out.stderr)


def test_admin_and_debug_listen_on_loopback_only(mesh: devmesh.Mesh) -> None:
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if Path("/usr/bin/ss").exists() or Path("/bin/ss").exists() else ""
    if not listening:
        pytest.skip("ss is not available to list listening sockets")
    for key in ("envoy_admin_port", "xds_debug_port", "placement_metrics_port"):
        lines = [ln for ln in listening.splitlines() if f":{mesh.ports[key]} " in ln]
        assert lines and all("127.0.0.1:" in ln for ln in lines), (key, lines)


def test_a_load_error_tells_the_client_the_kind_not_the_store(tmp_path: Path) -> None:
    """Issue 18 §4: a model whose S3 store can't be reached. The client's 503 names the model and
    the kind of failure; the endpoint, bucket and key path are in `meshserve explain` only."""
    closed = devmesh.free_port()  # nothing listens here: every pull is refused
    entry = {"type": "s3", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "not-a-secret", "endpoint_url": f"http://127.0.0.1:{closed}",
             "region": "us-east-1", "bucket": "private-bucket"}
    cfg_file = tmp_path / "storage-config.json"
    cfg_file.write_text(json.dumps({"s3": json.dumps(entry)}))
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "s3-model.yaml").write_text(devmesh.inference_service(
        "s3-model", "sklearn", "      storage:\n        key: s3\n        path: secret-prefix/weights.joblib"))
    with devmesh.mesh(config_dir=cfg, pods=1, storage_config=cfg_file, cold_start_timeout_seconds=60) as m:
        req = urllib.request.Request(f"{m.rest}/v2/models/s3-model/infer", data=b'{"inputs": []}', method="POST")
        try:
            urllib.request.urlopen(req, timeout=120)
            raise AssertionError("a model with an unreachable store answered")
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read().decode()
        assert code == 503, body
        error = json.loads(body)["error"]
        assert error.startswith("model 's3-model__isvc-") and "could not be loaded" in error, error
        leaked = [s for s in ("private-bucket", "secret-prefix", "weights.joblib", "127.0.0.1", str(closed), "s3://", "store 's3'") if s in body]
        assert leaked == [], body
        explain = subprocess.run([sys.executable, "-m", "meshserve.cli", "explain", "s3-model", "--redis-url", m.redis_url],
                                 capture_output=True, text=True, timeout=60)
        # The operator's view keeps the details the client did not get.
        assert "private-bucket" in explain.stdout and f"127.0.0.1:{closed}" in explain.stdout, explain.stdout + explain.stderr
