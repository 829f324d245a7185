"""Model formats the built-in runtime can load. Each loader returns an object with
`predict(InferRequest) -> {output name: ndarray}` and `metadata()`.

sklearn files (joblib, pickle) and user model classes execute code when loaded: only load models
you trust. docs/security.md says which formats are safe and how to allow only those
(`allow_executable=False`, from MESHSERVE_ALLOW_EXECUTABLE_FORMATS).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from meshserve.extras import needs
from meshserve_loader.builtin.codec import CodecError, InferRequest
from meshserve_loader.builtin.textgen import v2_predict


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
                out[name] = np.asarray(_client_values(self.est.predict, x))
            elif name == "predict_proba" and hasattr(self.est, "predict_proba"):
                out[name] = np.asarray(_client_values(self.est.predict_proba, x))
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
            with needs("runtime", "an sklearn model"):
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


def _client_values(predict: Callable[[np.ndarray], Any], x: np.ndarray) -> Any:
    """scikit-learn and the boosters check their input and raise ValueError for what the client
    sent (NaN or infinity where the estimator takes none, zero rows): a 400 naming the problem,
    not a 500. Their other exceptions stay the model's own failure."""
    try:
        return predict(x)
    except ValueError as e:
        raise CodecError(f"the model rejected the input: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _numeric_2d(req: InferRequest, what: str) -> np.ndarray:
    x = req.inputs[0].array
    if x.dtype == object:
        raise CodecError(f"{what} models take numeric inputs, not BYTES")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise CodecError(f"{what} models take a 2-D input [rows, features]; got shape {list(x.shape)}")
    return x


class BoosterModel:
    """xgboost and lightgbm boosters: one numeric 2-D input, output `predict`."""

    def __init__(self, platform: str, booster: Any, n_features: int, predict: Callable[[np.ndarray], Any]):
        self.platform, self.booster, self.n_features, self._predict = platform, booster, n_features, predict

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        x = _numeric_2d(req, self.platform)
        if self.n_features > 0 and x.shape[1] != self.n_features:
            raise CodecError(f"model expects {self.n_features} features per row, got {x.shape[1]}")
        for name in req.outputs or []:
            if name != "predict":
                raise CodecError(f"unknown output {name!r}; this model offers 'predict'")
        return {"predict": np.asarray(_client_values(self._predict, x))}

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "inputs": [{"name": "predict", "datatype": "FP32", "shape": [-1, self.n_features]}],
            "outputs": [{"name": "predict", "datatype": "FP32", "shape": [-1]}],
        }


def load_xgboost(path: Path, params: dict[str, Any]) -> Model:
    # Only xgboost's own formats: a .pkl booster would be a pickle, refused here.
    f = _model_file(path, (".json", ".ubj", ".bst", ".model"))
    with needs("runtime", "an xgboost model"):
        import xgboost as xgb

    try:
        booster = xgb.Booster()
        booster.load_model(str(f))
    except Exception as e:  # xgboost raises XGBoostError (a ValueError) with C++ text
        raise ModelLoadError(f"cannot read {f.name} as an xgboost model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return BoosterModel("xgboost", booster, int(booster.num_features()), lambda x: booster.predict(xgb.DMatrix(x)))


def load_lightgbm(path: Path, params: dict[str, Any]) -> Model:
    f = _model_file(path, (".txt", ".bst", ".model", ".lgb"))
    with needs("runtime", "a lightgbm model"):
        import lightgbm as lgb

    try:
        booster = lgb.Booster(model_file=str(f))
    except Exception as e:  # LightGBMError on a corrupt file
        raise ModelLoadError(f"cannot read {f.name} as a lightgbm model: {e}") from None
    return BoosterModel("lightgbm", booster, int(booster.num_feature()), booster.predict)


_ONNX_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(float16)": np.float16,
    "tensor(string)": object,
}
_ONNX_DATATYPE = {np.float32: "FP32", np.float64: "FP64", np.int64: "INT64", np.int32: "INT32", np.int8: "INT8",
                  np.uint8: "UINT8", np.bool_: "BOOL", np.float16: "FP16", object: "BYTES"}


class OnnxModel:
    def __init__(self, session: Any):
        self.sess = session
        self.inputs = session.get_inputs()
        self.outputs = [o.name for o in session.get_outputs()]

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        given = {t.name: t.array for t in req.inputs}
        feed: dict[str, np.ndarray] = {}
        for i, spec in enumerate(self.inputs):
            # Match by name; a lone input may be sent under any name (clients often say "input-0").
            arr = given.get(spec.name)
            if arr is None and len(self.inputs) == 1 and len(req.inputs) == 1:
                arr = req.inputs[0].array
            if arr is None:
                raise CodecError(f"this ONNX model needs input {spec.name!r} (it takes {', '.join(s.name for s in self.inputs)})")
            want = _ONNX_TYPES.get(spec.type)
            if want is not None and want is not object and arr.dtype != want:
                arr = arr.astype(want)
            feed[spec.name] = arr
        names = req.outputs or self.outputs
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise CodecError(f"unknown output {unknown[0]!r}; this model offers {', '.join(self.outputs)}")
        try:
            values = self.sess.run(names, feed)
        except Exception as e:  # onnxruntime's InvalidArgument etc.: the client's input is wrong
            raise CodecError(f"ONNX model rejected the input: {str(e).splitlines()[0]}") from None
        return {n: np.asarray(v) for n, v in zip(names, values)}

    def metadata(self) -> dict[str, Any]:
        def shape(s: Any) -> list[int]:
            return [d if isinstance(d, int) else -1 for d in s.shape]

        def dt(t: str) -> str:
            return _ONNX_DATATYPE.get(_ONNX_TYPES.get(t, np.float32), "FP32")

        return {
            "platform": "onnx",
            "inputs": [{"name": s.name, "datatype": dt(s.type), "shape": shape(s)} for s in self.inputs],
            "outputs": [{"name": s.name, "datatype": dt(s.type), "shape": shape(s)} for s in self.sess.get_outputs()],
        }


def load_onnx(path: Path, params: dict[str, Any]) -> Model:
    f = _model_file(path, (".onnx",))
    with needs("runtime", "an onnx model"):
        import onnxruntime as ort

    opts = ort.SessionOptions()
    # Many models share a pod's cores: one thread each keeps one model from starving the rest.
    opts.intra_op_num_threads = int(params.get("threads") or 1)
    opts.inter_op_num_threads = 1
    try:
        return OnnxModel(ort.InferenceSession(str(f), sess_options=opts, providers=["CPUExecutionProvider"]))
    except Exception as e:  # InvalidProtobuf, Fail, ...
        raise ModelLoadError(f"cannot read {f.name} as an ONNX model: {str(e).splitlines()[0]}") from None


class UserModel:
    """A user's model class, MLServer MLModel style: constructed with its settings, then
    `load()`, then `predict(inputs: {name: ndarray}) -> {name: ndarray}`; either may be async."""

    def __init__(self, obj: Any, name: str):
        self.obj, self.name = obj, name

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        if not callable(getattr(self.obj, "predict", None)):  # a class that only generates (textgen.py)
            return v2_predict(self.obj, req)
        out = _run_maybe_async(self.obj.predict({t.name: t.array for t in req.inputs}))
        if not isinstance(out, dict):
            raise ModelLoadError(f"{self.name}.predict must return a dict of output name -> array, got {type(out).__name__}")
        return {k: np.asarray(v) for k, v in out.items()}

    def metadata(self) -> dict[str, Any]:
        md = getattr(self.obj, "metadata", None)
        return md() if callable(md) else {"platform": "custom", "inputs": [], "outputs": []}


def _run_maybe_async(v: Any) -> Any:
    return asyncio.run(v) if inspect.isawaitable(v) else v  # worker threads have no event loop


def _model_settings(path: Path) -> dict[str, Any]:
    f = (path if path.is_dir() else path.parent) / "model-settings.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{f} is not valid JSON: {e}") from None


def load_user_class(path: Path, params: dict[str, Any]) -> Model:
    """`implementation` ("module.Class") from the load parameters or the model dir's
    model-settings.json (MLServer's key). The module is looked for in the model dir first, then
    among installed packages."""
    settings = _model_settings(path)
    impl = str(params.get("implementation") or settings.get("implementation") or "")
    module_name, _, cls_name = impl.rpartition(".")
    if not module_name or not cls_name:
        raise ModelLoadError("a custom model needs 'implementation': 'module.ClassName' in model-settings.json or the load parameters")
    model_dir = path if path.is_dir() else path.parent
    local = model_dir / (module_name.replace(".", "/") + ".py")
    try:
        if local.exists():
            # A unique module name per load: two models may both ship a `model.py`.
            spec = importlib.util.spec_from_file_location(f"meshserve_user_{uuid.uuid4().hex}", local)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot import {impl}: {type(e).__name__}: {e}") from None
    settings = {**settings, "parameters": {**(settings.get("parameters") or {}), "uri": str(path)}}
    try:
        obj = cls(settings)
        ok = _run_maybe_async(obj.load()) if hasattr(obj, "load") else True
    except Exception as e:
        raise ModelLoadError(f"{impl}.load() failed: {type(e).__name__}: {e}") from None
    if ok is False:
        raise ModelLoadError(f"{impl}.load() returned False")
    if not any(callable(getattr(obj, m, None)) for m in ("predict", "complete", "chat")):
        raise ModelLoadError(f"{impl} has no predict() method (nor complete() or chat(), for a model that generates text)")
    return UserModel(obj, impl)


def _text_errors(fn: Callable[[], Model]) -> Model:
    from meshserve_loader.builtin.text import TextModelError

    try:
        return fn()
    except TextModelError as e:
        raise ModelLoadError(str(e)) from None


def load_text_encoder(path: Path, params: dict[str, Any]) -> Model:
    """The `sentence-transformers` format (builtin/text.py): a shared base for adapters."""
    from meshserve_loader.builtin.text import TextEncoder

    return _text_errors(lambda: TextEncoder(path if path.is_dir() else path.parent))


def load_peft_adapter(path: Path, params: dict[str, Any]) -> Model:
    """The `peft` format: an adapter over its base's loaded model, which the runtime hands in as
    `base_model_object` (table.Runtime loads or shares the base; an adapter never does)."""
    from meshserve_loader.builtin.text import load_adapter

    base = params.get(BASE_OBJECT)
    if base is None:
        raise ModelLoadError("a peft adapter is loaded over its base model: the load must name the base "
                             "(`base_path`, which the loader resolves from the model's meshserve.io/base-model)")
    return _text_errors(lambda: load_adapter(path if path.is_dir() else path.parent, base))


# The load parameter through which the runtime hands an adapter its base's loaded model.
BASE_OBJECT = "base_model_object"

LOADERS: dict[str, Callable[[Path, dict[str, Any]], Model]] = {
    "sklearn": load_sklearn,
    "string": load_string,
    "xgboost": load_xgboost,
    "lightgbm": load_lightgbm,
    "onnx": load_onnx,
    "custom": load_user_class,
    "sentence-transformers": load_text_encoder,
    "peft": load_peft_adapter,
}
# Formats whose files run code when loaded (pickle; a user's Python class).
EXECUTABLE_FORMATS = frozenset({"sklearn", "custom"})


def builtin_formats() -> list[str]:
    return sorted(LOADERS)


def load_model(fmt: str, path: Path, params: dict[str, Any] | None = None, allow_executable: bool = True) -> Model:
    fmt = fmt.lower()
    params = params or {}
    if (fmt not in LOADERS or fmt == "peft") and (params.get("implementation") or _model_settings(path).get("implementation")):
        fmt = "custom"  # the users' own format name (e.g. peft-model), served by their class
    loader = LOADERS.get(fmt)
    if loader is None:
        raise ModelLoadError(f"the built-in runtime cannot load format {fmt!r}; it serves {', '.join(sorted(LOADERS))}")
    if fmt in EXECUTABLE_FORMATS and not allow_executable:
        raise ModelLoadError(
            f"format {fmt!r} runs code from the model file when loaded, and this runtime allows only "
            f"non-executable formats ({', '.join(sorted(set(LOADERS) - EXECUTABLE_FORMATS))}); "
            "set MESHSERVE_ALLOW_EXECUTABLE_FORMATS=true if you trust the model's source"
        )
    return loader(path, params)
