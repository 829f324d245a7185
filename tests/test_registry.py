"""Kind: unit (pure). InferenceService YAML to model specs, with file:line:field errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve import registry
from meshserve.apply import read_models
from meshserve.yamlfile import ConfigError, load_documents

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures"


def test_concrete_id_follows_modelmesh_naming() -> None:
    mid = registry.concrete_model_id("sklearn-mnist", {"model": {"modelFormat": {"name": "sklearn"}}})
    assert mid.startswith("sklearn-mnist__isvc-") and len(mid.split("-")[-1]) == 10
    # A spec change is a new concrete model; the same spec is the same id, whatever the key order.
    assert mid != registry.concrete_model_id("sklearn-mnist", {"model": {"modelFormat": {"name": "xgboost"}}})
    assert registry.concrete_model_id("a", {"x": 1, "y": 2}) == registry.concrete_model_id("a", {"y": 2, "x": 1})


def test_users_fixtures_parse() -> None:
    if not FIXTURES.exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    for name in ("inferenceservice-pvc.yaml", "inferenceservice-s3.yaml", "inferenceservice-custom-runtime.yaml"):
        (doc,) = load_documents(FIXTURES / name)
        spec = registry.parse_inference_service(doc)
        assert spec.id.startswith(doc.data["metadata"]["name"] + "__isvc-")
    (doc,) = load_documents(FIXTURES / "inferenceservice-custom-runtime.yaml")
    assert registry.parse_inference_service(doc).runtime == "peft-model-server"


def test_mesh_config_has_the_example() -> None:
    (spec,) = read_models(REPO / "mesh-config")
    assert spec.alias == "sklearn-mnist" and spec.format == "sklearn"
    assert spec.storage["parameters"] == {"type": "pvc", "name": "my-models-pvc"}


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: m\nspec:\n  predictor:\n    model:\n      storage:\n        path: x\n"
    )
    with pytest.raises(ConfigError) as e:
        read_models(f)
    assert e.value.file == str(f) and e.value.line == 7
    assert "spec.predictor.model.modelFormat.name" in str(e.value)
    f.write_text("kind: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        read_models(f)


def test_a_key_given_twice_is_refused_where_it_repeats(tmp_path: Path) -> None:
    """kubectl refuses a mapping key defined twice; PyYAML alone keeps the last one, so
    `name: dupe` then `name: dupe2` registered dupe2 without a word. Anchors and merge keys
    (`<<: *base`) are not repeats."""
    f = tmp_path / "dup.yaml"
    f.write_text(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: dupe\n  name: dupe2\n"
        "spec:\n  predictor:\n    model:\n      modelFormat: {name: sklearn}\n      storage: {path: x}\n"
    )
    with pytest.raises(ConfigError) as e:
        read_models(f)
    assert (e.value.line, e.value.field) == (5, "metadata.name")
    assert "'name' is already defined at line 4" in str(e.value)
    f.write_text("base: &b {a: 1}\nthere: {<<: *b, c: 2}\nagain: *b\n")
    assert load_documents(f)[0].data["there"] == {"a": 1, "c": 2}


def test_a_model_format_that_is_not_a_string_says_so(tmp_path: Path) -> None:
    f = tmp_path / "typed.yaml"
    f.write_text("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata:\n  name: m\n"
                 "spec:\n  predictor:\n    model:\n      modelFormat:\n        name: [sklearn]\n      storage: {path: x}\n")
    with pytest.raises(ConfigError, match=r"typed.yaml:9: spec.predictor.model.modelFormat.name: must be a string, e.g. sklearn; got a list"):
        read_models(f)
