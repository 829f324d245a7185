"""`meshserve apply -f m.yaml && curl …/v2/models/m/infer`: the request right after apply is
served; after `meshserve delete isvc m`, refused. Before, apply returned once the registry had the model, and a request that beat the
gateway's route push (tens of ms) got 404 "not found".

Kind: e2e (a mesh of its own, so the session's keeps its registry: real Envoy configured by
our xDS server, Valkey, runtimes)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from meshserve.cli import cli
from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh() -> Iterator[devmesh.Mesh]:
    with devmesh.mesh(config_dir=REPO / "mesh-config") as m:
        yield m


def test_a_request_right_after_apply_is_served(mesh: devmesh.Mesh, fixtures: Path, tmp_path: Path) -> None:
    body = (fixtures / "mnist-request-proto-json.json").read_bytes()
    text = (REPO / "mesh-config" / "sklearn-mnist.yaml").read_text()
    answers = []
    for i in range(3):
        name = f"fresh-mnist-{i}"
        f = tmp_path / f"{name}.yaml"
        f.write_text(text.replace("name: sklearn-mnist", f"name: {name}"))
        res = CliRunner().invoke(cli, ["apply", "-f", str(f)], env={"MESHSERVE_REDIS_URL": mesh.redis_url})
        assert res.exit_code == 0 and "not applied the new routes" not in res.output, res.output
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{mesh.rest}/v2/models/{name}/infer", data=body, method="POST"), timeout=60) as r:
                answers.append(json.loads(r.read())["outputs"][0]["contents"]["int64Contents"])
        except urllib.error.HTTPError as e:
            answers.append(f"HTTP {e.code}: {e.read()[:200]!r}")
    assert answers == [["8"]] * 3, answers


def test_delete_stops_routing_a_name_at_once(mesh: devmesh.Mesh, fixtures: Path, tmp_path: Path) -> None:
    """`meshserve delete isvc NAME` in embedded mode, as deleting the object does in a cluster:
    the request right after it gets the gateway's 404; the next apply brings it back. Before:
    there was no way to remove a model outside a cluster but editing Redis."""
    body = (fixtures / "mnist-request-proto-json.json").read_bytes()
    env = {"MESHSERVE_REDIS_URL": mesh.redis_url}
    url = f"{mesh.rest}/v2/models/sklearn-mnist/infer"

    def status() -> int | str:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return f"{e.code} {json.loads(e.read())['error']}"

    assert status() == 200
    res = CliRunner().invoke(cli, ["delete", "isvc", "sklearn-mnist"], env=env)
    assert res.exit_code == 0 and "inferenceservice/sklearn-mnist deleted" in res.output, res.output
    gone = status()
    assert isinstance(gone, str) and gone.startswith("404") and "not found" in gone, gone
    res = CliRunner().invoke(cli, ["delete", "isvc", "sklearn-mnist"], env=env)
    assert res.exit_code == 1 and "no InferenceService or Predictor named 'sklearn-mnist'" in res.output, res.output
    res = CliRunner().invoke(cli, ["apply", "-f", str(REPO / "mesh-config" / "sklearn-mnist.yaml")], env=env)
    assert res.exit_code == 0, res.output
    assert status() == 200
