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
from meshserve import devmesh

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client_python() -> Path:
    return ensure_clients(REPO)


def _calls(py: Path, mesh: devmesh.Mesh, model: str) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for group in ("triton", "kserve"):
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
