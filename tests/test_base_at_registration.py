"""Issue 17 item 1: an adapter that names its base only in PEFT's adapter_config.json
(`base_model_name_or_path`) gets `ModelSpec.base` at registration, read from its storage
(meshserve_loader/predict.py, rules/config.py `read_storage`), so placement knows the base
before the first load. The e2e case is e2e/test_adapter_placement.py.

Kind: real server for S3 (moto in server mode on 127.0.0.1, the testing package's storage
server, stopped at the end); local files otherwise; `read_storage` with an in-memory predictor.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Iterator

import pytest

from meshserve.model import ModelSpec
from meshserve.registry import FromStorage
from meshserve.rules.config import read_storage
from meshserve.yamlfile import ConfigError
from meshserve_loader.predict import Predictor
from meshserve_loader.storage import from_disk
from meshserve_loader.storage_config import parse_secret
from meshserve_testing.storage_servers import moto_server

boto3 = pytest.importorskip("boto3", reason="boto3 is a dependency of meshserve: run `make install`")

CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "sentence-transformers/minilm"}, indent=2)
BROKEN = '{\n  "peft_type": "LORA",\n  "base_model_name_or_path": 7\n}'


def _spec(name: str, storage: dict, fmt: str = "peft", base: str = "") -> ModelSpec:
    return ModelSpec(id=f"{name}__isvc-0000000001", alias=name, format=fmt, storage=storage, base=base)


def _pvc(path: str) -> dict:
    return {"parameters": {"type": "pvc", "name": "vol"}, "path": path}


def _run(p: Predictor, *specs: ModelSpec) -> dict[str, FromStorage]:
    return asyncio.run(p(list(specs)))


def test_local_adapter_config_names_the_base_and_the_annotation_wins(tmp_path: Path) -> None:
    root = tmp_path / "pvc" / "vol"
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "adapter_config.json").write_text(CONFIG)
    (root / "acme" / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (root / "svm").mkdir()
    (root / "svm" / "model.joblib").write_bytes(b"m" * 100)
    p = Predictor(tmp_path / "pvc", {})
    adapter, plain = _spec("acme", _pvc("acme")), _spec("svm", _pvc("svm/model.joblib"), fmt="sklearn")
    stated = _spec("stated", _pvc("acme"), base="other-base")  # meshserve.io/base-model
    got = _run(p, adapter, plain, stated)
    assert got[adapter.id].base == "minilm" and got[adapter.id].base_file == str(root / "acme" / "adapter_config.json")
    assert got[adapter.id].size == from_disk(len(CONFIG) + 1000)
    assert got[plain.id] == FromStorage(from_disk(100))  # no adapter_config.json: no base
    assert got[stated.id].base == ""  # its spec names one: the file is not read

    # A broken file fails registration with its path and line, as the annotation's errors do.
    (root / "acme" / "adapter_config.json").write_text(BROKEN)
    with pytest.raises(ConfigError) as e:
        _run(p, adapter, plain)
    assert str(e.value).startswith(f"{root / 'acme' / 'adapter_config.json'}:3: base_model_name_or_path: must be a string"), str(e.value)
    assert _run(p, stated)[stated.id].base == ""  # the annotation wins: a file it overrides is not read
    (root / "acme" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "hub/acme"}))
    with pytest.raises(ConfigError, match="acme itself"):
        _run(p, adapter)


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    with moto_server() as url:
        c = boto3.client("s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
        c.create_bucket(Bucket="models")
        c.put_object(Bucket="models", Key="adapters/acme/adapter_config.json", Body=CONFIG.encode())
        c.put_object(Bucket="models", Key="adapters/acme/adapter_model.safetensors", Body=b"w" * 1000)
        c.put_object(Bucket="models", Key="adapters/broken/adapter_config.json", Body=BROKEN.encode())
        # A single object is pulled alone: a config beside it is not the model's (as the loader sees it).
        c.put_object(Bucket="models", Key="single/model.joblib", Body=b"m" * 100)
        c.put_object(Bucket="models", Key="single/adapter_config.json", Body=CONFIG.encode())
        entry = {"type": "s3", "access_key_id": "k", "secret_access_key": "s", "endpoint_url": url, "bucket": "models"}
        yield parse_secret({"store": json.dumps(entry)})


def test_s3_adapter_config_is_read_through_the_pullers_client(tmp_path: Path, s3: dict) -> None:
    p = Predictor(tmp_path / "pvc", s3)
    adapter = _spec("acme", {"key": "store", "path": "adapters/acme"})
    by_uri = _spec("acme-uri", {"key": "store", "uri": "s3://models/adapters/acme"})
    single = _spec("single", {"key": "store", "path": "single/model.joblib"}, fmt="sklearn")
    got = _run(p, adapter, by_uri, single)
    assert got[adapter.id] == FromStorage(from_disk(len(CONFIG) + 1000), "minilm", "s3://models/adapters/acme/adapter_config.json")
    assert got[by_uri.id].base == "minilm"
    assert got[single.id] == FromStorage(from_disk(100))
    with pytest.raises(ConfigError) as e:
        _run(p, _spec("broken", {"key": "store", "path": "adapters/broken"}))
    assert str(e.value).startswith("s3://models/adapters/broken/adapter_config.json:3: base_model_name_or_path:"), str(e.value)


def test_registration_reads_a_base_once_and_the_annotation_wins() -> None:
    read: list[str] = []

    async def predict(specs: list[ModelSpec]) -> dict[str, FromStorage]:
        read.extend(s.alias for s in specs)
        return {s.id: FromStorage(1000, "minilm", f"/pvc/{s.alias}/adapter_config.json") for s in specs}

    new, stated = _spec("new", {}), _spec("stated", {}, base="other")
    notes = asyncio.run(read_storage([new, stated], {}, predict))
    assert (new.base, stated.base) == ("minilm", "other")
    assert notes == ["new: its base is minilm (base_model_name_or_path in /pvc/new/adapter_config.json)"]
    # Applied again: the same id is the same storage entry, registered with its base: no read.
    read.clear()
    stored = {new.id: new, stated.id: stated}
    again = [_spec("new", {}), _spec("stated", {}, base="other")]
    assert asyncio.run(read_storage(again, stored, predict)) == [] and read == []
    assert [s.base for s in again] == ["minilm", "other"] and again[0].predicted_size == 1000
