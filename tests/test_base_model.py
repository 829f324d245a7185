"""Kind: unit (pure). Declaring a model's base (issue 17, item 1): the `meshserve.io/base-model`
annotation and PEFT's adapter_config.json, with file:line errors."""

from __future__ import annotations

import json

import pytest

from meshserve import registry
from meshserve.model import ModelSpec
from meshserve.yamlfile import ConfigError, load_documents
from meshserve_testing import devmesh


def _isvc(name: str, annotations: str = "") -> str:
    return devmesh.inference_service(name, "peft", devmesh.pvc_storage("models", f"adapters/{name}"), annotations)


def _parse(text: str) -> ModelSpec:
    (doc,) = load_documents("isvc.yaml", text)
    return registry.parse_inference_service(doc)


def test_annotation_names_the_base() -> None:
    spec = _parse(_isvc("acme-lora", "    meshserve.io/base-model: minilm\n"))
    assert spec.base == "minilm"
    assert ModelSpec.from_json(spec.to_json()).base == "minilm"


def test_no_annotation_no_base_and_ids_unchanged() -> None:
    plain = _parse(_isvc("acme-lora"))
    assert plain.base == ""
    # The id of a model without a base is what it was before bases existed.
    (doc,) = load_documents("isvc.yaml", _isvc("acme-lora"))
    assert plain.id == registry.concrete_model_id("acme-lora", doc.data["spec"]["predictor"])
    # Another base is another concrete model.
    a = _parse(_isvc("acme-lora", "    meshserve.io/base-model: minilm\n"))
    b = _parse(_isvc("acme-lora", "    meshserve.io/base-model: mpnet\n"))
    assert len({plain.id, a.id, b.id}) == 3


@pytest.mark.parametrize("value,words", [
    ("sentence-transformers/all-MiniLM-L6-v2", "no '/'"),
    ("acme-lora", "its own base"),
    ('""', "must be the name"),
])
def test_bad_annotation_says_file_line(value: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse(_isvc("acme-lora", f"    meshserve.io/base-model: {value}\n"))
    assert e.value.file == "isvc.yaml" and e.value.line == 7, str(e.value)
    assert e.value.field == "metadata.annotations.meshserve.io/base-model" and words in str(e.value)


def test_old_specs_without_base_still_read() -> None:
    raw = json.dumps({"id": "m__isvc-0", "alias": "m", "format": "sklearn", "storage": {}})
    assert ModelSpec.from_json(raw).base == ""


def test_adapter_config_names_the_base() -> None:
    cfg = json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "sentence-transformers/minilm"}, indent=2)
    assert registry.base_from_adapter_config(cfg) == "minilm"
    assert registry.base_from_adapter_config(json.dumps({"base_model_name_or_path": "/models/minilm/"})) == "minilm"
    assert registry.base_from_adapter_config(json.dumps({"peft_type": "LORA"})) == ""


def test_adapter_config_errors_say_file_line() -> None:
    with pytest.raises(ConfigError) as e:
        registry.base_from_adapter_config('{\n  "r": 4,\n  "base_model_name_or_path": \n}', "acme/adapter_config.json")
    assert str(e.value).startswith("acme/adapter_config.json:4:") and "not valid JSON" in str(e.value)
    with pytest.raises(ConfigError) as e:
        registry.base_from_adapter_config('{\n  "r": 4,\n  "base_model_name_or_path": 7\n}', "acme/adapter_config.json")
    assert e.value.line == 3 and e.value.field == "base_model_name_or_path"
    with pytest.raises(ConfigError):
        registry.base_from_adapter_config("[]")
