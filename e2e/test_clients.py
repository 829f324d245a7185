"""The clients ModelMesh users bring, unchanged, through the gateway (issue 14 items 1 and 2):
tritonclient over HTTP (binary tensors, its default, and JSON) and gRPC (with and without
`mm-vmodel-id`), its metadata calls, and the kserve SDK's REST (binary and JSON) and gRPC
clients. Each must get the digits SVM's answer, 8, exactly as it gets it from Triton.

Kind: e2e. Real Envoy configured by our xDS server, Valkey, built-in runtimes; the real client
packages from PyPI in a venv of their own (e2e/clientlib), run as a user's script would be.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from e2e.clientlib.venv import ensure_clients
from meshserve_testing import devmesh

# The first run installs the clients into their own venv (a few minutes, more on a busy machine):
# the install, in the module fixture, counts against each test's timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client_python() -> Path:
    return ensure_clients(REPO)


def _calls(py: Path, mesh: devmesh.Mesh, model: str, groups: tuple[str, ...] = ("triton", "kserve")) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for group in groups:
        out = subprocess.run([str(py), str(REPO / "e2e" / "clientlib" / "calls.py"), mesh.rest, mesh.grpc, model, group],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        got.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return got


def test_tritonclient_and_kserve_sdk_through_the_gateway(mesh: devmesh.Mesh, client_python: Path) -> None:
    got = _calls(client_python, mesh, "sklearn-mnist")
    failed = {k: v["error"] + "\n" + v.get("trace", "") for k, v in got.items() if "error" in v}
    assert not failed, json.dumps(failed, indent=1)
    for call in ("tritonclient.http binary", "tritonclient.http json", "tritonclient.grpc", "tritonclient.grpc mm-vmodel-id",
                 "kserve rest binary", "kserve rest json", "kserve grpc"):
        assert got[call]["ok"] == [[8]], (call, got[call])
    md = got["tritonclient metadata"]["ok"]
    assert md["http_live"] is True
    assert md["http_inputs"] and md["grpc_inputs"], md


def test_tritonclient_model_control_through_the_gateway(mesh: devmesh.Mesh, client_python: Path) -> None:
    """The v2 repository extension at the gateway (issue 14 item 3), by InferenceService name:
    the index lists every registered model with its state, an explicit load pins a copy (the
    placement leader keeps it, as the `meshserve.io/pinned` annotation does) and answers once it
    is loaded, an unload drops the pin, and an unknown name is a 404. Before: 404 for all. The
    same over tritonclient.grpc (before: UNIMPLEMENTED, ServerMetadata included)."""
    import redis

    calls = _calls(client_python, mesh, "sklearn-mnist-b", ("repository",))
    got = calls["repository"]
    assert "ok" in got, got
    res = got["ok"]
    # The same over gRPC (Triton's repository RPCs; before: UNIMPLEMENTED, ServerMetadata too).
    g = calls["repository grpc"]
    assert "ok" in g, g
    g = g["ok"]
    assert g["server"]["name"] == "meshserve" and "model_repository" in g["server"]["extensions"], g["server"]
    assert g["ready_after_load"] is True
    assert {"name": "sklearn-mnist-b", "state": "READY"}.items() <= next(m for m in g["index"] if m["name"] == "sklearn-mnist-b").items(), g["index"]
    assert g["unknown"].startswith("StatusCode.NOT_FOUND") and "not found" in g["unknown"], g["unknown"]
    assert g["config_override"].startswith("StatusCode.INVALID_ARGUMENT") and "parameter 'config' is not supported" in g["config_override"], g["config_override"]
    names = {m["name"]: m for m in res["index"]}
    assert {"sklearn-mnist", "sklearn-mnist-b", "broken-model"} <= set(names), names
    assert all(m["state"] in ("READY", "LOADING", "UNAVAILABLE") for m in names.values())
    assert res["ready_after_load"] is True
    assert "not found" in res["unknown"], res["unknown"]
    # {"ready": true}: only READY models, as Triton filters them; the one just loaded among them.
    assert {m["state"] for m in res["ready_index"]} == {"READY"} and "sklearn-mnist-b" in {m["name"] for m in res["ready_index"]}
    # Triton's config extension: a 404 in v2 error JSON (was aiohttp's text, which the client
    # could not parse: "an exception occurred in the client while decoding the response").
    assert res["config"].startswith("404: no such endpoint") and "not served" in res["config"], res["config"]
    # A config override Triton would load with is refused by name, not ignored.
    assert "parameter 'config' is not supported" in res["config_override"], res["config_override"]
    r = redis.Redis.from_url(mesh.redis_url)
    try:
        model_id = r.hget("ms:aliases", "sklearn-mnist-b").decode()
        # The unload's unpin reaches the leader through its request stream: wait for it.
        devmesh.wait_until(lambda: not r.hexists("ms:pins", model_id), 10, "the pin dropped")
        loaded = [p for p, c in json.loads(r.hget("ms:placements", model_id)).items() if c["state"] == "loaded"]
    finally:
        r.close()
    assert loaded, "the model was loaded by the explicit load"


def _activator_requests(mesh: devmesh.Mesh) -> float:
    _, text = devmesh.http_get(f"http://127.0.0.1:{mesh.ports['placement_metrics_port']}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines() if line.startswith("meshserve_activator_requests_total{"))


def test_tritonclient_streams_through_the_gateway(mesh: devmesh.Mesh, client_python: Path, tmp_path: Path) -> None:
    """tritonclient.grpc's stream (Triton's ModelStreamInfer) through the gateway, to a model
    loaded and to one registered a moment before (cold: the activator holds the stream until
    the load, then passes it on), with `mm-vmodel-id` and without (Envoy reads the first
    request's model); warm, either way, Envoy sends it straight to the pod. Each stream: an answer per request in
    order, a bad request's error in its place (Triton's: its id kept), and the next request
    answered. Before: UNIMPLEMENTED from the runtime; without the header, the gateway held
    the stream until the client closed it."""
    from click.testing import CliRunner

    from meshserve.cli import cli

    text = (REPO / "mesh-config" / "sklearn-mnist.yaml").read_text()
    env = {"MESHSERVE_REDIS_URL": mesh.redis_url}
    cold = ["stream-mnist-a", "stream-mnist-b"]
    for name in cold:
        f = tmp_path / f"{name}.yaml"
        f.write_text(text.replace("name: sklearn-mnist", f"name: {name}"))
        res = CliRunner().invoke(cli, ["apply", "-f", str(f)], env=env)
        assert res.exit_code == 0, res.output
    try:
        got = {**{f"cold {k}": v for k, v in _calls(client_python, mesh, cold[0], ("stream",)).items() if k == "stream"},
               **{f"cold {k}": v for k, v in _calls(client_python, mesh, cold[1], ("stream",)).items() if k == "stream mm-vmodel-id"}}
        _calls(client_python, mesh, "sklearn-mnist", ("stream",))  # loads it, if no test before did
        before = _activator_requests(mesh)
        got.update({f"warm {k}": v for k, v in _calls(client_python, mesh, "sklearn-mnist", ("stream",)).items()})
        # Warm, with or without the header, Envoy sends the stream to the pod itself.
        assert _activator_requests(mesh) == before
    finally:
        for name in cold:
            CliRunner().invoke(cli, ["delete", "isvc", name], env=env)
    assert len(got) == 4, got
    for call, v in got.items():
        assert "ok" in v, (call, v)
        first, bad, last = v["ok"]
        assert first == {"id": "a", "predict": [[8]]} and last == {"id": "b", "predict": [[8]]}, (call, v["ok"])
        assert "error" in bad and "3" in bad["error"] and "64" in bad["error"], (call, bad)
