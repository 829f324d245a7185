"""Issue 8: `meshserve status` and `meshserve models` against a running mesh.

Kind: e2e (real Valkey and mesh via the session `mesh` fixture; the CLI runs as a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e


def cli(mesh: devmesh.Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshserve.cli", *args, "--redis-url", mesh.redis_url],
        capture_output=True, text=True, timeout=60,
    )


def test_status_and_models(mesh: devmesh.Mesh, fixtures: Path) -> None:
    subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{mesh.rest}/v2/models/sklearn-mnist/infer", "-d", f"@{fixtures / 'mnist-request-proto-json.json'}"],
        check=True, capture_output=True, timeout=120,
    )
    out = cli(mesh, "status", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {p["id"] for p in data["pods"]} == {"pod-0", "pod-1"}
    mnist = next(m for m in data["models"] if m["alias"] == "sklearn-mnist")
    assert "loaded" in mnist["copies"].values() and mnist["size"] > 0
    human = cli(mesh, "status")
    assert human.returncode == 0 and "pod-0" in human.stdout and "sklearn-mnist" in human.stdout

    loaded = json.loads(cli(mesh, "models", "--json", "--state", "loaded").stdout)
    assert "sklearn-mnist" in [m["alias"] for m in loaded]
    assert all("loaded" in m["copies"].values() for m in loaded)
    assert "broken-model" not in [m["alias"] for m in loaded]
    named = json.loads(cli(mesh, "models", "--json", "--name", "broken").stdout)
    assert [m["alias"] for m in named] == ["broken-model"]


def test_status_without_a_mesh_says_what_to_do() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshserve.cli", "status", "--redis-url", f"redis://127.0.0.1:{devmesh.free_port()}/0"],
        capture_output=True, text=True, timeout=60,
    )
    # 1, a failure (issue 16): 2 is kept for usage errors, as kubectl's.
    assert out.returncode == 1 and "Is `meshserve up` running" in out.stderr
