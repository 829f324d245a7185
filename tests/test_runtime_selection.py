"""Kind: unit. ServingRuntime parsing and runtime selection (supportedModelFormats, autoSelect,
explicit `runtime:`): pure functions, on the users' fixture YAML unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.yamlfile import load_documents
from meshserve_placement import policy
from meshserve_loader.serving_runtime import (
    Format, RuntimeSelectionError, RuntimeSpec, builtin_runtime, parse_serving_runtime, select_runtime,
    serving_runtimes,
)

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


@pytest.fixture(scope="module")
def fixture_runtimes() -> list[RuntimeSpec]:
    if not FIXTURES.exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    docs = [d for f in ("servingruntime-custom-mlserver.yaml", "servingruntime-triton.yaml") for d in load_documents(FIXTURES / f)]
    return serving_runtimes(docs)


def test_fixture_runtimes_parse(fixture_runtimes: list[RuntimeSpec]) -> None:
    peft = next(r for r in fixture_runtimes if r.name == "peft-model-server")
    assert peft.server_type == "mlserver" and peft.mem_buffer_bytes == 134217728 and peft.loading_timeout_ms == 90000
    assert peft.formats == (Format("peft-model", "1", True),)
    assert ("MLSERVER_MODELS_DIR", "/models/_mlserver_models/") in peft.env
    triton = next(r for r in fixture_runtimes if r.name == "triton-2.x")
    assert triton.format_names() == ["pytorch", "tensorflow"] and triton.server_type == "builtin"


def test_selection(fixture_runtimes: list[RuntimeSpec]) -> None:
    rts = [*fixture_runtimes, builtin_runtime(["sklearn", "onnx"])]
    # The users' custom-runtime InferenceService names its runtime explicitly.
    assert select_runtime("peft-model", "", "peft-model-server", rts).name == "peft-model-server"
    assert select_runtime("peft-model", "1", "", rts).name == "peft-model-server"  # autoSelect
    assert select_runtime("sklearn", "", "", rts).name == "meshserve-builtin"
    with pytest.raises(RuntimeSelectionError, match="declare it without autoSelect"):
        select_runtime("pytorch", "", "", rts)  # the triton fixture declares pytorch, not autoSelect
    assert select_runtime("pytorch", "", "triton-2.x", rts).name == "triton-2.x"
    with pytest.raises(RuntimeSelectionError, match="does not declare format sklearn"):
        select_runtime("sklearn", "", "triton-2.x", rts)
    with pytest.raises(RuntimeSelectionError, match="'nope' is not defined"):
        select_runtime("sklearn", "", "nope", rts)
    with pytest.raises(RuntimeSelectionError, match="no runtime auto-selects format peft-model version 2"):
        select_runtime("peft-model", "2", "", rts)


def test_ties_are_broken_by_name_and_pod_filter() -> None:
    a = RuntimeSpec("b-rt", (Format("onnx", "", True),))
    b = RuntimeSpec("a-rt", (Format("onnx", "", True),))
    assert select_runtime("onnx", "", "", [a, b]).name == "a-rt"
    # The pod side of the rule is placement's `serves-model` filter.
    pods = {"peft": policy.PodView("peft", 1 << 30, ["peft-model"], runtime="peft-model-server"),
            "builtin": policy.PodView("builtin", 1 << 30, ["sklearn"], runtime="meshserve-builtin")}
    cv = policy.ClusterView(pods=pods, models={})

    def pod_for(fmt: str, explicit: str) -> str | None:
        return policy.place(policy.ModelView("m", fmt, 1, runtime=explicit), cv, now=1.0).pod

    assert pod_for("peft-model", "peft-model-server") == "peft"
    assert pod_for("sklearn", "peft-model-server") is None
    assert pod_for("sklearn", "") == "builtin"


def test_bad_runtime_yaml() -> None:
    with pytest.raises(RuntimeSelectionError, match="serverType 'tfserving'"):
        parse_serving_runtime({"kind": "ServingRuntime", "metadata": {"name": "x"}, "spec": {"builtInAdapter": {"serverType": "tfserving"}}})
    with pytest.raises(RuntimeSelectionError, match="needs a name"):
        parse_serving_runtime({"kind": "ServingRuntime", "metadata": {"name": "x"}, "spec": {"supportedModelFormats": [{}]}})
