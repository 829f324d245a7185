"""A custom runtime's image as a local folder (runtime_image.py), the runtime's default MLServer
class, and the gRPC pass-through's rename of the model (limiter.renamed). Kind: unit."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve_loader.limiter import renamed
from meshserve_loader.servers.mlserver import LayoutError, model_settings
from meshserve_loader.runtime_image import RuntimeImageError, dockerfile_env, parse_images
from meshserve_proto import grpc_predict_v2_pb2 as pb


def test_parse_images(tmp_path: Path) -> None:
    assert parse_images(f"registry.example/peft-model-server:latest={tmp_path}, a@sha256:00=/x") == {
        "registry.example/peft-model-server:latest": tmp_path, "a@sha256:00": Path("/x")}
    assert parse_images("") == {}
    with pytest.raises(RuntimeImageError, match="expected <image>=<folder>"):
        parse_images("just-an-image")


def test_dockerfile_env(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM seldonio/mlserver:1.7.1-slim\nENV MLSERVER_MODEL_IMPLEMENTATION=peft_model_server.PeftModelServer\n"
        "ENV A=1 \\\n    B=\"two words\"\nENV LEGACY some value\nRUN echo ENV=no\n")
    assert dockerfile_env(tmp_path / "Dockerfile") == {
        "MLSERVER_MODEL_IMPLEMENTATION": "peft_model_server.PeftModelServer", "A": "1", "B": "two words", "LEGACY": "some value"}
    assert dockerfile_env(tmp_path / "missing") == {}


def test_runtime_default_implementation(tmp_path: Path) -> None:
    f = tmp_path / "weights"
    f.mkdir()
    with pytest.raises(LayoutError, match="MLSERVER_MODEL_IMPLEMENTATION"):
        model_settings("peft-demo__isvc-1", "peft-model", f)
    s = model_settings("peft-demo__isvc-1", "peft-model", f, "peft_model_server.PeftModelServer")
    assert s["implementation"] == "peft_model_server.PeftModelServer" and s["parameters"]["uri"] == str(f.resolve())
    (f / "model-settings.json").write_text('{"implementation": "own.Model"}')  # the model's own wins
    assert model_settings("m", "peft-model", f, "peft_model_server.PeftModelServer")["implementation"] == "own.Model"


def test_renamed_sets_the_model_and_keeps_the_rest() -> None:
    req = pb.ModelInferRequest(model_name="peft-demo", id="r1", inputs=[pb.ModelInferRequest.InferInputTensor(name="content", datatype="BYTES", shape=[1])])
    req.inputs[0].contents.bytes_contents.append(b"x" * 300)
    long_id = "peft-demo__isvc-" + "a" * 200  # a two-byte length
    out = pb.ModelInferRequest.FromString(renamed(req.SerializeToString(), long_id))
    assert out.model_name == long_id and out.id == "r1" and out.inputs[0].contents.bytes_contents == [b"x" * 300]
    assert pb.ModelMetadataRequest.FromString(renamed(pb.ModelMetadataRequest(name="a").SerializeToString(), "a__isvc-1")).name == "a__isvc-1"
