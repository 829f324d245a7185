"""`meshserve apply` in cluster mode goes through the Kubernetes API, so the controller keeps
what it applied. Kind: fake list/watch API server (meshserve_testing.fakeapi) with the real
`kubernetes` client over HTTP, and a real Valkey (local processes on 127.0.0.1 only, all
stopped; each test bounded to seconds)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshserve.store import State, keys
from meshserve.cli import cli
from meshserve_testing.fakeapi import FakeApiServer
from meshserve_testing.k8s import running_controller, until

REPO = Path(__file__).resolve().parent.parent
NS = "modelmesh-serving"
MNIST = REPO / "mesh-config" / "sklearn-mnist.yaml"
EXAMPLES = REPO / "mesh-config" / "examples"
RUNTIME = {"metadata": {"name": "meshserve-builtin"}, "spec": {"supportedModelFormats": [{"name": "sklearn", "autoSelect": True}]}}
NO_REDIS = "redis://127.0.0.1:1/0"  # cluster mode must never need the mesh's Redis


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.1) as srv:
        srv.apply("servingruntimes", RUNTIME)
        yield srv


def kubeconfig(tmp_path: Path, api: FakeApiServer, namespace: str | None = None) -> Path:
    f = tmp_path / "kubeconfig"
    ctx: dict[str, Any] = {"cluster": "fake", "user": "u", **({"namespace": namespace} if namespace else {})}
    f.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": ctx}],
    }))
    return f


def meshserve(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env={"MESHSERVE_REDIS_URL": NO_REDIS, "MESHSERVE_MODE": None, "KUBECONFIG": None, **(env or {})},
                              catch_exceptions=False)


async def test_embedded_apply_into_a_cluster_mesh_is_undone_by_the_controller(api: FakeApiServer, state: State, valkey: Any) -> None:
    """The bug: `meshserve apply` without cluster mode writes Redis; the controller, which owns
    the registry in cluster mode, removes the alias on its next pass."""
    # In a thread: the command runs its own event loop (asyncio.run).
    r = await asyncio.to_thread(CliRunner().invoke, cli, ["apply", "-f", str(MNIST), "--redis-url", valkey.url], env={"MESHSERVE_MODE": None})
    assert r.exit_code == 0, r.output
    assert await state.r.hget(keys.ALIASES, "sklearn-mnist")
    async with running_controller(api, state) as c:
        await until(lambda: c.reconciles >= 2, "two passes")
        await until(lambda: _no_alias(state), "alias removed")


async def _no_alias(state: State) -> bool:
    return not await state.r.hget(keys.ALIASES, "sklearn-mnist")


async def test_cluster_mode_apply_goes_through_the_api_and_the_controller_keeps_it(api: FakeApiServer, state: State, tmp_path: Path) -> None:
    kc = kubeconfig(tmp_path, api)
    r = await asyncio.to_thread(meshserve, "apply", "-f", str(MNIST), "--kubeconfig", str(kc), "-n", NS)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "inferenceservice/sklearn-mnist created"
    obj = api.get("inferenceservices", "sklearn-mnist")
    assert obj and obj["spec"] == yaml.safe_load(MNIST.read_text())["spec"] and obj["metadata"]["namespace"] == NS
    assert not [q for q in api.requests if q.method in ("PUT", "PATCH")]
    # Again: unchanged, nothing written.
    assert (await asyncio.to_thread(meshserve, "apply", "-f", str(MNIST), "--kubeconfig", str(kc), "-n", NS)).output.strip() == "inferenceservice/sklearn-mnist unchanged"
    async with running_controller(api, state) as c:
        alias = await until(lambda: state.r.hget(keys.ALIASES, "sklearn-mnist"), "alias registered")
        n = c.reconciles
        await until(lambda: c.reconciles >= n + 3, "three more passes")
        assert await state.r.hget(keys.ALIASES, "sklearn-mnist") == alias, "the controller removed what cluster-mode apply created"
        # The rule examples, models and rule in one apply: the rule is checked against the
        # files' models and the cluster's, sent as a TrafficRule, and registered by the controller.
        r = await asyncio.to_thread(meshserve, "apply", "-f", str(EXAMPLES / "models.yaml"), "-f", str(EXAMPLES / "split.yaml"),
                      env={"MESHSERVE_MODE": "cluster", "KUBECONFIG": str(kc)})
        assert r.exit_code == 0, r.output
        assert "trafficrule/sklearn-mnist-split created" in r.output.splitlines()
        await until(lambda: state.r.hget(keys.RULES, "sklearn-mnist-split"), "rule registered")
        await until(lambda: ((api.get("trafficrules", "sklearn-mnist-split") or {}).get("status") or {}).get("phase") == "Active", "rule Active")
        # A changed spec replaces the object (kept resourceVersion, status untouched).
        changed = tmp_path / "mnist.yaml"
        doc = yaml.safe_load(MNIST.read_text())
        doc["metadata"].setdefault("annotations", {})["meshserve.io/minCopies"] = "2"
        changed.write_text(yaml.safe_dump(doc))
        r = await asyncio.to_thread(meshserve, "apply", "-f", str(changed), "--kubeconfig", str(kc))  # namespace: the default
        assert r.output.strip() == "inferenceservice/sklearn-mnist configured", r.output
        assert (api.get("inferenceservices", "sklearn-mnist") or {}).get("status"), "replace must keep status"
        # Deleting a rule in cluster mode deletes the object; the controller takes it out of Redis.
        r = await asyncio.to_thread(meshserve, "delete", "rule", "sklearn-mnist-split", "--kubeconfig", str(kc))
        assert r.exit_code == 0 and api.get("trafficrules", "sklearn-mnist-split") is None, r.output
        await until(lambda: _rule_gone(state, "sklearn-mnist-split"), "rule removed from Redis")
        # The same for an InferenceService: the object goes, and the controller drops its name.
        r = await asyncio.to_thread(meshserve, "delete", "isvc", "sklearn-mnist-v2", "--kubeconfig", str(kc))
        assert r.exit_code == 0 and r.output.strip() == "inferenceservice/sklearn-mnist-v2 deleted", r.output
        assert api.get("inferenceservices", "sklearn-mnist-v2") is None
        await until(lambda: _alias_gone(state, "sklearn-mnist-v2"), "alias removed from Redis")
        r = await asyncio.to_thread(meshserve, "delete", "isvc", "sklearn-mnist-v2", "--kubeconfig", str(kc))
        assert r.exit_code == 1 and "no InferenceService named 'sklearn-mnist-v2'" in r.output, r.output


async def _alias_gone(state: State, name: str) -> bool:
    return not await state.r.hget(keys.ALIASES, name)


async def _rule_gone(state: State, name: str) -> bool:
    return not await state.r.hget(keys.RULES, name)


def test_cluster_mode_refuses_bad_input_before_sending_anything(api: FakeApiServer, tmp_path: Path) -> None:
    kc = kubeconfig(tmp_path, api, namespace=NS)
    bad = tmp_path / "rule.yaml"
    bad.write_text("apiVersion: meshserve.io/v1alpha1\nkind: TrafficRule\nmetadata: {name: r}\n"
                   "spec:\n  model: sklearn-mnist\n  routes: [{to: [{model: nope}]}]\n")
    r = meshserve("apply", "-f", str(MNIST), "-f", str(bad), "--kubeconfig", str(kc))
    assert r.exit_code == 1
    assert "unknown model 'nope'" in r.output and "nothing was changed" in r.output
    assert api.get("inferenceservices", "sklearn-mnist") is None
    # The dry run says what would happen and sends nothing.
    r = meshserve("apply", "-f", str(MNIST), "--kubeconfig", str(kc), "--dry-run")
    assert r.exit_code == 0 and r.output.strip() == "inferenceservice/sklearn-mnist created (dry run)"
    assert api.get("inferenceservices", "sklearn-mnist") is None
    # Another namespace in the file than on the command line: refused, as kubectl does.
    other = tmp_path / "other.yaml"
    doc = yaml.safe_load(MNIST.read_text())
    doc["metadata"]["namespace"] = "elsewhere"
    other.write_text(yaml.safe_dump(doc))
    r = meshserve("apply", "-f", str(other), "--kubeconfig", str(kc))
    assert r.exit_code == 1 and "namespace 'elsewhere'" in r.output


def test_cluster_mode_without_credentials_or_api_says_what_to_do(tmp_path: Path) -> None:
    r = meshserve("apply", "-f", str(MNIST), "--kubeconfig", str(tmp_path / "missing"))
    assert r.exit_code == 1 and "--kubeconfig" in r.output and "--mode embedded" in r.output
    # An API server that is not there.
    with FakeApiServer() as gone:
        kc = kubeconfig(tmp_path, gone)
    r = meshserve("apply", "-f", str(MNIST), "--kubeconfig", str(kc))
    assert r.exit_code == 1 and "cannot reach the Kubernetes API" in r.output, r.output
    # --mode embedded with cluster flags is a usage error (2).
    r = meshserve("apply", "-f", str(MNIST), "--mode", "embedded", "-n", NS)
    assert r.exit_code == 2

