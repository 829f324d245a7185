"""Kind: unit (real libraries, files in tmp). Each built-in format loads and predicts the seed's
digit; corrupt files, wrong formats and refused executable formats fail with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from meshserve_loader import example_models as ex
from meshserve_loader.builtin.codec import CodecError, InferRequest, Tensor
from meshserve_loader.builtin.formats import ModelLoadError, load_model

FIXTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "mnist-request-v2-rest.json"


def _seed_row() -> np.ndarray:
    if FIXTURE.exists():
        return np.array(json.loads(FIXTURE.read_text())["inputs"][0]["data"], dtype=np.float32).reshape(1, 64)
    from sklearn.datasets import load_digits

    return load_digits().data[:1].astype(np.float32)


def _req(x: np.ndarray, name: str = "predict") -> InferRequest:
    return InferRequest([Tensor(name, "FP32", list(x.shape), x)])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for fmt, (name, write) in ex.WRITERS.items():
        if fmt == "onnx":
            pytest.importorskip("onnx", reason="onnx is a test extra: run `make install`")
        out[fmt] = write(d / name)
    return out


@pytest.mark.parametrize("fmt", ["sklearn", "xgboost", "lightgbm", "onnx"])
def test_format_predicts_the_seed_digit(models: dict[str, Path], fmt: str) -> None:
    m = load_model(fmt, models[fmt])
    out = m.predict(_req(_seed_row()))
    first = next(iter(out.values())).reshape(-1)
    if fmt == "lightgbm":  # multiclass: per-class probabilities
        assert int(np.argmax(first)) == 8
    else:
        assert int(first[0]) == 8, out
    assert m.metadata()["platform"] == fmt
    # A directory holding the file loads too (S3 prefixes and PVC dirs arrive that way).
    assert load_model(fmt, models[fmt].parent if fmt != "sklearn" else models[fmt]) is not None


def test_onnx_input_any_name_and_bad_shape(models: dict[str, Path]) -> None:
    m = load_model("onnx", models["onnx"])
    assert m.predict(_req(_seed_row(), name="input-0"))["label"].reshape(-1).tolist() == [8]
    assert list(m.predict(InferRequest([Tensor("x", "FP32", [1, 64], _seed_row())], outputs=["scores"]))) == ["scores"]
    with pytest.raises(CodecError, match="rejected the input"):
        m.predict(_req(np.zeros((1, 5), dtype=np.float32)))
    assert m.metadata()["inputs"] == [{"name": "predict", "datatype": "FP32", "shape": [-1, 64]}]


def test_sklearn_input_it_refuses_is_the_clients_error(models: dict[str, Path]) -> None:
    """Issue 18: scikit-learn's ValueError on NaN, infinity or zero rows was a 500 (gRPC
    UNKNOWN); it is the client's input, so a CodecError (400) with sklearn's first line."""
    m = load_model("sklearn", models["sklearn"])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _seed_row().copy()
        x[0, 3] = bad
        with pytest.raises(CodecError, match="rejected the input: Input X contains"):
            m.predict(_req(x))
    with pytest.raises(CodecError, match="0 sample"):
        m.predict(_req(np.zeros((0, 64), dtype=np.float32)))
    assert int(m.predict(_req(_seed_row()))["predict"][0]) == 8


@pytest.mark.parametrize("fmt,suffix", [("sklearn", ".joblib"), ("xgboost", ".json"), ("lightgbm", ".txt"), ("onnx", ".onnx")])
def test_corrupt_file_is_a_load_error(tmp_path: Path, fmt: str, suffix: str) -> None:
    f = tmp_path / f"corrupt{suffix}"
    f.write_bytes(b"\x00this is not a model\xff" * 10)
    with pytest.raises(ModelLoadError, match="cannot read corrupt"):
        load_model(fmt, f)


def test_wrong_format_and_unknown_format(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model("xgboost", models["onnx"])  # no xgboost file there
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model("onnx", Path(shutil.copy(models["xgboost"], tmp_path / "x.onnx")))
    with pytest.raises(ModelLoadError, match="cannot load format 'pytorch'"):
        load_model("pytorch", models["sklearn"])


def test_executable_formats_can_be_refused(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="runs code from the model file"):
        load_model("sklearn", models["sklearn"], allow_executable=False)
    with pytest.raises(ModelLoadError, match="MESHSERVE_ALLOW_EXECUTABLE_FORMATS"):
        load_model("custom", ex.write_user_model(tmp_path / "u"), allow_executable=False)
    assert load_model("onnx", models["onnx"], allow_executable=False) is not None


def test_user_model_class(tmp_path: Path) -> None:
    d = ex.write_user_model(tmp_path / "reverse")
    # The users' own format name (as in a custom ServingRuntime) finds the class by model-settings.json.
    m = load_model("peft-model", d)
    out = m.predict(InferRequest([Tensor("text", "BYTES", [2], np.array([b"abc", b"xy"], dtype=object))]))
    assert out["reversed"].tolist() == [b">cba", b">yx"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model-settings.json").write_text(json.dumps({"implementation": "nomodule.Nope"}))
    with pytest.raises(ModelLoadError, match="cannot import nomodule.Nope"):
        load_model("custom", tmp_path / "bad")
    (tmp_path / "bad" / "model-settings.json").write_text(json.dumps({}))
    with pytest.raises(ModelLoadError, match="needs 'implementation'"):
        load_model("custom", tmp_path / "bad")
