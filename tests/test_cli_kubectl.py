"""Issue 16: the CLI as kubectl users expect: `-o json|yaml|wide`, `describe`, `-f -`,
`apply --dry-run`, `diff`, and one exit-code convention (0 ok, 1 failed, 2 usage).

Kind: unit (click's CliRunner, no Redis) for the pure cases; integration (a real Valkey via
meshserve_testing.devmesh.valkey(), no mesh) for commands that read or write state, seeded by hand
the way placement and the loaders write it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from click.testing import CliRunner

from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.cli import cli
from meshserve.model import Copy, Pod, copies_to_json

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO / "mesh-config" / "sklearn-mnist.yaml"
EXAMPLES = REPO / "mesh-config" / "examples"


def _dead_url() -> str:
    return f"redis://127.0.0.1:{devmesh.free_port()}/0"


# --- unit: no Redis --------------------------------------------------------------------------


def test_help_documents_the_exit_codes() -> None:
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    assert "Exit status: 0 ok; 1 failed" in res.output and "2 usage" in res.output


@pytest.mark.parametrize("args,says", [
    (["models", "-o", "xml"], "'xml' is not one of 'json', 'yaml', 'wide'"),
    (["models", "--json", "-o", "yaml"], "--json and -o yaml ask for different formats"),
    (["describe", "deployment", "x"], "'deployment' is not one of 'model'"),
    (["apply", "-f", "x.yaml", "--dry-run=always"], "'always' is not one of 'none', 'client', 'server'"),
    (["diff"], "Missing option '-f'"),
])
def test_usage_errors_exit_2(args: list[str], says: str) -> None:
    res = CliRunner().invoke(cli, args, env={"MESHSERVE_REDIS_URL": _dead_url()})
    assert res.exit_code == 2 and says in res.output, res.output


@pytest.mark.parametrize("args", [["status"], ["models", "-o", "yaml"], ["explain", "m"], ["load", "m"], ["get", "rules"],
                                  ["describe", "model", "m"], ["describe", "pod", "p"], ["describe", "rule", "r"],
                                  ["apply", "-f", str(MNIST)], ["apply", "--dry-run", "-f", str(MNIST)], ["promote", "r"]])
def test_redis_unreachable_is_a_failure_not_a_usage_error(args: list[str]) -> None:
    """It was 2, the code of a bad option: a script could not tell them apart."""
    res = CliRunner().invoke(cli, args, env={"MESHSERVE_REDIS_URL": _dead_url()})
    assert res.exit_code == 1, res.output
    assert "cannot reach the mesh's Redis" in res.output and "--redis-url" in res.output


def test_apply_reads_stdin_and_errors_name_it() -> None:
    """`-f -` was taken as a file named '-'. Invalid input fails before Redis is needed."""
    bad = MNIST.read_text().replace("name: sklearn\n", "name: [sklearn\n", 1)
    res = CliRunner().invoke(cli, ["apply", "-f", "-"], input=bad, env={"MESHSERVE_REDIS_URL": _dead_url()})
    assert res.exit_code == 1, res.output
    assert "<stdin>:" in res.output and "not valid YAML" in res.output and "nothing was changed" in res.output
    no_kind = "apiVersion: v1\nmetadata:\n  name: x\n"
    res = CliRunner().invoke(cli, ["apply", "--dry-run", "-f", "-"], input=no_kind, env={"MESHSERVE_REDIS_URL": _dead_url()})
    assert res.exit_code == 1 and "<stdin>:1: kind: required" in res.output, res.output


def test_diff_of_invalid_input_is_an_error_above_1(tmp_path: Path) -> None:
    """As `kubectl diff`: 1 means "differences", so an error must be more."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Nope\nmetadata: {name: x}\n")
    res = CliRunner().invoke(cli, ["diff", "-f", str(bad)], env={"MESHSERVE_REDIS_URL": _dead_url()})
    assert res.exit_code == 3 and "bad.yaml:1: kind: meshserve does not handle kind Nope" in res.output, res.output


# --- integration: real Valkey ----------------------------------------------------------------


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with devmesh.valkey() as v:
        yield v.url


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_state(url: str, fn: Any) -> Any:
    s = st.State.from_url(url)
    try:
        return await fn(s)
    finally:
        await s.close()


def _invoke(url: str, *args: str, input: str | None = None) -> Any:
    # Wide enough that rich's tables (80 columns off a terminal) do not cut the cells tested.
    return CliRunner().invoke(cli, list(args), input=input, env={"MESHSERVE_REDIS_URL": url, "COLUMNS": "250"})


def _flush(url: str) -> None:
    _run(_with_state(url, lambda s: s.r.flushdb()))


def _aliases(url: str) -> dict[str, str]:
    async def read(s: st.State) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in (await s.r.hgetall(st.ALIASES)).items()}

    return _run(_with_state(url, read))  # type: ignore[no-any-return]


def test_apply_from_stdin_dry_run_and_diff(url: str) -> None:
    _flush(url)
    text = MNIST.read_text()
    res = _invoke(url, "apply", "--dry-run", "-f", "-", input=text)
    assert res.exit_code == 0 and res.output.strip() == "inferenceservice/sklearn-mnist created (dry run)", res.output
    assert _aliases(url) == {}, "a dry run writes nothing"
    res = _invoke(url, "diff", "-f", "-", input=text)
    assert res.exit_code == 1 and "+++ new/inferenceservice/sklearn-mnist" in res.output and "+format: sklearn" in res.output, res.output

    res = _invoke(url, "apply", "-f", "-", input=text)
    assert res.exit_code == 0 and "inferenceservice/sklearn-mnist -> sklearn-mnist__isvc-" in res.output, res.output
    assert "sklearn-mnist" in _aliases(url)
    res = _invoke(url, "apply", "--dry-run=server", "-f", str(MNIST))
    assert res.exit_code == 0 and "inferenceservice/sklearn-mnist unchanged (dry run)" in res.output, res.output
    res = _invoke(url, "diff", "-f", str(MNIST))
    assert res.exit_code == 0 and res.output == "", res.output

    changed = text.replace("annotations:", "annotations:\n    meshserve.io/minCopies: \"2\"", 1) if "annotations:" in text else None
    assert changed and changed != text
    before = _aliases(url)
    res = _invoke(url, "apply", "-f", "-", "--dry-run=client", "-f", str(EXAMPLES / "models.yaml"), input=changed)
    assert res.exit_code == 0, res.output
    assert "inferenceservice/sklearn-mnist configured (dry run)" in res.output
    assert "inferenceservice/sklearn-mnist-v2 created (dry run)" in res.output
    assert _aliases(url) == before, "a dry run writes nothing"
    res = _invoke(url, "diff", "-f", "-", input=changed)
    assert res.exit_code == 1, res.output
    assert "--- stored/inferenceservice/sklearn-mnist" in res.output and "-min_copies: 0" in res.output and "+min_copies: 2" in res.output


def test_output_formats_on_reading_commands(url: str) -> None:
    _flush(url)
    assert _invoke(url, "apply", "-f", str(MNIST), "-f", str(EXAMPLES / "models.yaml"), "-f", str(EXAMPLES / "split.yaml")).exit_code == 0
    _seed_pod(url)
    for args in (["status"], ["models"], ["get", "rules"], ["explain", "sklearn-mnist"]):
        as_json = _steady(json.loads(_invoke(url, *args, "--json").output))
        assert _steady(json.loads(_invoke(url, *args, "-o", "json").output)) == as_json, args  # --json is -o json
        assert _steady(yaml.safe_load(_invoke(url, *args, "-o", "yaml").output)) == as_json, args
    wide = _invoke(url, "models", "-o", "wide", "--name", "sklearn-mnist-v2")
    assert wide.exit_code == 0 and "runtime" in wide.output and "min copies" in wide.output and "unlimited" in wide.output, wide.output
    assert "min copies" not in _invoke(url, "models").output
    wide = _invoke(url, "status", "-o", "wide")
    assert "max loading" in wide.output and "builtin" in wide.output, wide.output
    wide = _invoke(url, "get", "rules", "-o", "wide")
    assert "IN PHASE FOR" in wide.output and "sklearn-mnist-split" in wide.output, wide.output


def test_not_found_is_1_everywhere(url: str) -> None:
    """`explain` said 1 and `load` said 2 for the same thing."""
    for args in (["explain", "nope"], ["load", "nope"], ["load", "nope", "--json"], ["describe", "isvc", "nope"],
                 ["describe", "pod", "nope"], ["describe", "rule", "nope"], ["rollback", "nope"]):
        res = _invoke(url, *args)
        assert res.exit_code == 1, (args, res.output)
    assert "see `meshserve models`" in _invoke(url, "describe", "model", "nope").output


def _steady(doc: object) -> object:
    """The document without what moves between two calls: ages measured at call time."""
    if isinstance(doc, dict):
        return {k: _steady(v) for k, v in doc.items() if not k.endswith("_age_s")}
    if isinstance(doc, list):
        return [_steady(v) for v in doc]
    return doc


def _seed_pod(url: str) -> None:
    async def go(s: st.State) -> None:
        pod = Pod("pod-0", "127.0.0.1", 8001, 9001, 1 << 30, formats=["sklearn"], runtime="builtin", max_loading=2)
        await s.r.hset(st.PODS, "pod-0", pod.to_json())
        await s.r.zadd(st.HEARTBEATS, {"pod-0": time.time() + 600})  # fresh throughout, however slow the machine

    _run(_with_state(url, go))


def test_describe_model_pod_and_rule(url: str) -> None:
    from meshserve.store.keys import DECISIONS

    _flush(url)
    assert _invoke(url, "apply", "-f", str(MNIST), "-f", str(EXAMPLES / "models.yaml"), "-f", str(EXAMPLES / "split.yaml")).exit_code == 0
    _seed_pod(url)
    now = time.time()
    mid = _aliases(url)["sklearn-mnist"]
    other = _aliases(url)["sklearn-mnist-v2"]

    async def seed(s: st.State) -> None:
        await s.r.hset(st.PLACEMENTS, mid, copies_to_json({"pod-0": Copy("loaded", 3 << 20, now - 30), "pod-1": Copy("failed", 0, now - 60, "storage: no such file")}))
        decision = {"pod": "pod-0", "evict": [], "reason": "", "considered": "1 pod considered", "ts": now - 31,
                    "trace": [{"pod": "pod-0", "step": "capacity", "result": "fits"}], "leader": "placement-a", "why": "a request is waiting"}
        await s.r.hset(DECISIONS, mid, json.dumps(decision))
        # As the loader writes them (loader/meshserve_loader/agent.py).
        await s.r.xadd(st.EVENTS, {"pod": "pod-1", "model": mid, "op": "load", "ok": "0", "size": "0", "reason": "storage: no such file", "ts": str(now - 60)})
        await s.r.xadd(st.EVENTS, {"pod": "pod-0", "model": mid, "op": "load", "ok": "1", "size": str(3 << 20), "reason": "", "ts": str(now - 30)})
        await s.r.xadd(st.EVENTS, {"pod": "pod-0", "model": other, "op": "load", "ok": "1", "size": "5", "reason": "", "ts": str(now - 20)})
        await s.r.xadd(st.POD_EVENTS, {"op": "runtime_restart", "pod": "pod-0", "models": json.dumps([mid]), "reason": "runtime exited 137", "ts": str(now - 10)})

    _run(_with_state(url, seed))
    res = _invoke(url, "describe", "isvc", "sklearn-mnist")
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"Model:          {mid}" in out and "Kind:           InferenceService" in out
    assert re.search(r"^  Format: +sklearn$", out, re.M) and re.search(r"^  Min copies: +0$", out, re.M), out
    assert re.search(r"^  Storage: +.*path=mnist-svm.joblib", out, re.M), out
    assert "pod-0  loaded  3.0 MiB" in out and "storage: no such file" in out
    assert "last placement decision" in out and "pod-0: capacity: fits" in out and "=> pod-0" in out
    events = out[out.index("Events:"):]
    assert "Warning  LoadFailed" in events and "Normal   Loaded" in events and "RuntimeRestarted" in events and "runtime exited 137" in events
    assert other not in events, "another model's events are not this one's"
    assert events.index("LoadFailed") < events.index("Loaded ") < events.index("RuntimeRestarted"), "oldest first, as kubectl"
    assert _invoke(url, "describe", "model", mid).output == out, "by concrete id too"

    res = _invoke(url, "describe", "pod", "pod-0")
    assert res.exit_code == 0, res.output
    assert "Runtime:        builtin" in res.output and "Max loading:    2" in res.output and "Condition:      ok" in res.output
    assert "sklearn-mnist" in res.output and mid in res.output
    assert "RuntimeRestarted" in res.output and "LoadFailed" not in res.output, "pod-1's failure is not pod-0's"
    assert res.output.count("Loaded") == 2

    res = _invoke(url, "describe", "rule", "sklearn-mnist-split")
    assert res.exit_code == 0, res.output
    assert "Kind:           TrafficRule" in res.output and "Phase:          Active" in res.output
    assert "sklearn-mnist-v2=10%" in res.output and "Spec:" in res.output and "weight: 90" in res.output


def test_preview_compares_with_the_version_a_move_is_going_to() -> None:
    """Re-applying the file that started a version move is `unchanged`, though the alias still
    points at the old version and the new one is stored with the move's copy boost."""
    from meshserve.model import ModelSpec
    from meshserve.rules import plan as pl
    from meshserve.rules import preview

    old = ModelSpec("m__isvc-old", "m", "sklearn", {"path": "a"})
    new = ModelSpec("m__isvc-new", "m", "sklearn", {"path": "b"})
    boosted = ModelSpec("m__isvc-new", "m", "sklearn", {"path": "b"}, min_copies=2)
    snap = st.Snapshot(1, {old.id: old, new.id: boosted}, {"m": old.id}, {}, {})
    t = pl.Transition("m", old.id, new.id, 2, None, pl.T_LOADING, 0.0)
    t.extra["minCopies"] = 0
    after = preview.new_objects([new], {"m": "InferenceService"}, [])
    before = preview.stored(snap, {"m": t}, {}, preview.names(after))
    assert preview.verdicts(before, after) == [("inferenceservice/m", "unchanged")]
    assert preview.unified_diff(before, after) == ""
    # Without the move, the same file changes the stored version: configured, and the diff says how.
    before = preview.stored(snap, {}, {}, preview.names(after))
    assert preview.verdicts(before, after) == [("inferenceservice/m", "configured")]
    assert "-  path: a\n+  path: b\n" in preview.unified_diff(before, after)
