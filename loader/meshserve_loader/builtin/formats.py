"""Model formats the built-in runtime can load. Each loader returns an object with
`predict(InferRequest) -> {output name: ndarray}` and `metadata()`.

sklearn files (joblib, pickle) execute code when loaded: only load models you trust.
docs/security.md says which formats are safe and how to allow only those.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from meshserve_loader.builtin.codec import CodecError, InferRequest


class ModelLoadError(RuntimeError):
    pass


class Model(Protocol):
    def predict(self, req: InferRequest) -> dict[str, np.ndarray]: ...

    def metadata(self) -> dict[str, Any]: ...


class SklearnModel:
    def __init__(self, est: Any):
        if not hasattr(est, "predict"):
            raise ModelLoadError(f"file holds a {type(est).__name__}, which has no predict()")
        self.est = est
        self.n_features = int(getattr(est, "n_features_in_", -1))

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        x = req.inputs[0].array
        if x.dtype == object:
            raise CodecError("sklearn models take numeric inputs, not BYTES")
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2:
            raise CodecError(f"sklearn models take a 2-D input [rows, features]; got shape {list(x.shape)}")
        if self.n_features > 0 and x.shape[1] != self.n_features:
            raise CodecError(f"model expects {self.n_features} features per row, got {x.shape[1]}")
        wanted = req.outputs or ["predict"]
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            if name == "predict":
                out[name] = np.asarray(self.est.predict(x))
            elif name == "predict_proba" and hasattr(self.est, "predict_proba"):
                out[name] = np.asarray(self.est.predict_proba(x))
            else:
                raise CodecError(f"unknown output {name!r}; this model offers 'predict'")
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": "sklearn",
            "inputs": [{"name": "predict", "datatype": "FP32", "shape": [-1, self.n_features]}],
            "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
        }


class StringModel:
    """A tiny model whose file holds a string: it answers that string. Used for density tests."""

    def __init__(self, text: str):
        self.text = text

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        n = req.inputs[0].array.shape[0] if req.inputs and req.inputs[0].array.ndim else 1
        return {"output": np.array([self.text.encode()] * n, dtype=object)}

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": "string",
            "inputs": [{"name": "input", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "output", "datatype": "BYTES", "shape": [-1]}],
        }


def _model_file(path: Path, suffixes: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.suffix in suffixes:
                return p
        raise ModelLoadError(f"no {'/'.join(suffixes)} file in {path}")
    raise ModelLoadError(f"model path {path} does not exist")


def load_sklearn(path: Path, params: dict[str, Any]) -> Model:
    f = _model_file(path, (".joblib", ".pkl", ".pickle"))
    try:
        if f.suffix == ".joblib":
            import joblib

            est = joblib.load(f)
        else:
            with f.open("rb") as fh:
                est = pickle.load(fh)
    except Exception as e:  # a corrupt file can raise nearly anything
        raise ModelLoadError(f"cannot read {f.name} as an sklearn model: {type(e).__name__}: {e}") from None
    return SklearnModel(est)


def load_string(path: Path, params: dict[str, Any]) -> Model:
    f = _model_file(path, (".txt",))
    try:
        return StringModel(f.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {f.name}: {e}") from None


LOADERS: dict[str, Callable[[Path, dict[str, Any]], Model]] = {
    "sklearn": load_sklearn,
    "string": load_string,
}


def load_model(fmt: str, path: Path, params: dict[str, Any] | None = None) -> Model:
    loader = LOADERS.get(fmt.lower())
    if loader is None:
        raise ModelLoadError(f"the built-in runtime cannot load format {fmt!r}; it serves {', '.join(sorted(LOADERS))}")
    return loader(path, params or {})
