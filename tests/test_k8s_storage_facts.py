"""Cluster mode reads a model's stored files before registering it, as `meshserve apply` does:
its predicted size (disk x 1.25, issue 19 §2) and the base its PEFT adapter_config.json names
(issue 17 item 1), so placement books the right bytes and knows the base before the first load
(controller/meshserve_controller/storage_facts.py).

Kind: integration for the controller (the real `kubernetes` client against the fake list/watch
API server, a real Valkey, a real S3 server: moto in server mode; all on 127.0.0.1 and stopped);
unit for StorageFacts' once-per-id reading (an in-memory predictor and clock).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Mapping

import pytest

from meshserve.model import ModelSpec
from meshserve.registry import FromStorage
from meshserve.store import State
from meshserve_controller import registry_store
from meshserve_controller.storage_facts import RETRY_SECONDS, StorageFacts
from meshserve_loader.predict import Predictor
from meshserve_loader.storage import from_disk
from meshserve_testing.fakeapi import FakeApiServer
from meshserve_testing.k8s import running_controller, until
from meshserve_testing.storage_servers import moto_server

boto3 = pytest.importorskip("boto3", reason="boto3 is a dependency of meshserve: run `make install`")

RUNTIME = {
    "metadata": {"name": "meshserve-builtin"},
    "spec": {"supportedModelFormats": [{"name": "sklearn", "autoSelect": True}, {"name": "peft", "autoSelect": True}],
             "multiModel": True, "containers": [{"name": "runtime", "image": "meshserve/runtime"}]},
}
ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "sentence-transformers/minilm"})
BROKEN = '{\n  "peft_type": "LORA",\n  "base_model_name_or_path": 7\n}'


def _isvc(name: str, fmt: str, path: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"}},
        "spec": {"predictor": {"model": {"modelFormat": {"name": fmt}, "storage": {"key": "store", "path": path}}}},
    }


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.1) as srv:
        yield srv


async def test_registered_specs_carry_the_predicted_size_and_the_adapters_base(
        api: FakeApiServer, state: State, caplog: pytest.LogCaptureFixture) -> None:
    with moto_server() as url:
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="svm/model.joblib", Body=b"m" * 300_000)
        s3.put_object(Bucket="models", Key="acme/adapter_config.json", Body=ADAPTER_CONFIG.encode())
        s3.put_object(Bucket="models", Key="acme/adapter_model.safetensors", Body=b"w" * 40_000)
        s3.put_object(Bucket="models", Key="broken/adapter_config.json", Body=BROKEN.encode())
        entry = {"type": "s3", "access_key_id": "k", "secret_access_key": "s", "endpoint_url": url, "bucket": "models"}
        api.apply("servingruntimes", RUNTIME)
        api.apply("secrets", {"metadata": {"name": "storage-config"}, "stringData": {"store": json.dumps(entry)}})
        for name, fmt in (("svm", "sklearn"), ("acme", "peft"), ("broken", "peft")):
            api.apply("inferenceservices", _isvc(name, fmt, name))

        reads: list[str] = []

        def counting(secret: Mapping[str, Any] | None) -> Any:
            inner = Predictor.from_secret(secret)

            async def predict(specs: list[ModelSpec]) -> dict[str, FromStorage]:
                reads.extend(s.alias for s in specs)
                return await inner(specs)
            return predict

        with caplog.at_level(logging.INFO, logger="meshserve.k8s"):
            async with running_controller(api, state, predict_from=counting) as c:
                specs = await until(lambda: _specs(state, {"svm", "acme", "broken"}), "all three registered")
                passes = c.reconciles
                await until(lambda: c.reconciles >= passes + 3, "three more passes")
                specs = await registry_store.alias_specs(state)

    assert specs["svm"].predicted_size == from_disk(300_000) and specs["svm"].base == ""
    assert specs["acme"].base == "minilm"
    assert specs["acme"].predicted_size == from_disk(len(ADAPTER_CONFIG) + 40_000)
    # A broken adapter_config.json fails its own model only: registered without a base or a
    # prediction (its load then fails on the same file, which its status shows), and said in
    # the log.
    assert specs["broken"].base == "" and specs["broken"].predicted_size == 0
    assert "broken: " in caplog.text and "base_model_name_or_path: must be a string" in caplog.text
    assert "acme: its base is minilm" in caplog.text
    # Listed in one pass, not on every pass (the batch that met the broken file was read again
    # one model at a time, to keep the others' facts).
    assert sorted(reads) == ["acme", "acme", "broken", "broken", "svm", "svm"], reads


async def _specs(state: State, names: set[str]) -> dict[str, ModelSpec] | None:
    specs = await registry_store.alias_specs(state)
    return specs if names <= set(specs) else None


def _spec(name: str) -> ModelSpec:
    return ModelSpec(id=f"{name}__isvc-0000000001", alias=name, format="sklearn", storage={"key": "store", "path": name})


def test_a_failed_listing_is_tried_again_later_and_new_credentials_read_everything_again() -> None:
    now = [0.0]
    reads: list[tuple[str, str]] = []
    listable = {"a"}

    def predict_from(secret: Mapping[str, Any] | None) -> Any:
        key = str((secret or {}).get("stringData"))

        async def predict(specs: list[ModelSpec]) -> dict[str, FromStorage]:
            reads.extend((key, s.alias) for s in specs)
            return {s.id: FromStorage(100) for s in specs if s.alias in listable}
        return predict

    facts = StorageFacts(predict_from, clock=lambda: now[0])
    secret: dict[str, Any] = {"stringData": {"store": "v1"}}

    def fill() -> list[ModelSpec]:
        specs = [_spec("a"), _spec("b")]
        asyncio.run(facts.fill(specs, {}, secret))
        return specs

    assert [s.predicted_size for s in fill()] == [100, 0]
    fill()
    assert reads == [("{'store': 'v1'}", "a"), ("{'store': 'v1'}", "b")]  # known: not listed again
    listable.add("b")
    now[0] = RETRY_SECONDS + 1
    assert [s.predicted_size for s in fill()] == [100, 100]  # the failure is retried, later
    assert reads[2:] == [("{'store': 'v1'}", "b")]
    secret = {"stringData": {"store": "v2"}}
    fill()
    assert reads[3:] == [("{'store': 'v2'}", "a"), ("{'store': 'v2'}", "b")]
