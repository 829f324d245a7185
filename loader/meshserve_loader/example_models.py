"""Example models of each built-in format, trained on scikit-learn's bundled digits set (no
download): for tests, the size measurements in docs/design/loader.md, and demos. Each writer
returns the model's path and is atomic (temp file, then rename)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target


def _atomic(target: Path, write: Callable[[Path], Any]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
    write(tmp)
    os.replace(tmp, target)
    return target


def write_sklearn(target: Path) -> Path:
    import joblib
    from sklearn.svm import SVC

    x, y = _digits()
    model = SVC(gamma=0.001).fit(x, y)
    return _atomic(target, lambda p: joblib.dump(model, p))


def write_xgboost(target: Path) -> Path:
    from meshserve.extras import needs

    with needs("runtime", "the example models"):
        import xgboost as xgb

    x, y = _digits()
    booster = xgb.train({"objective": "multi:softmax", "num_class": 10, "max_depth": 4, "nthread": 1},
                        xgb.DMatrix(x, label=y), num_boost_round=20)
    return _atomic(target, lambda p: booster.save_model(str(p)))


def write_lightgbm(target: Path) -> Path:
    from meshserve.extras import needs

    with needs("runtime", "the example models"):
        import lightgbm as lgb

    x, y = _digits()
    booster = lgb.train({"objective": "multiclass", "num_class": 10, "num_leaves": 15, "verbose": -1, "num_threads": 1},
                        lgb.Dataset(x, label=y), num_boost_round=20)
    return _atomic(target, lambda p: booster.save_model(str(p)))


def write_onnx(target: Path) -> Path:
    """A logistic regression on digits as an ONNX graph (Gemm, then ArgMax): input `predict`
    [N, 64] FP32, output `label` [N, 1] INT64. Needs the `onnx` package (the runtime extra)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    x, y = _digits()
    lr = LogisticRegression(max_iter=2000).fit(x, y)
    w = numpy_helper.from_array(lr.coef_.T.astype(np.float32), "W")
    b = numpy_helper.from_array(lr.intercept_.astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["predict", "W", "B"], ["scores"]),
         helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=1)],
        "digits-logreg",
        [helper.make_tensor_value_info("predict", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None, 1]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 10])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by onnxruntime releases of the last few years
    onnx.checker.check_model(model)
    return _atomic(target, lambda p: onnx.save(model, str(p)))


USER_MODEL_PY = '''"""A user model class, MLServer MLModel style: load() then predict()."""
import numpy as np


class Reverse:
    def __init__(self, settings):
        self.settings = settings

    async def load(self):
        self.prefix = self.settings.get("parameters", {}).get("extra", {}).get("prefix", "")
        return True

    def predict(self, inputs):
        text = [bytes(v).decode() for v in inputs["text"].reshape(-1)]
        return {"reversed": np.array([(self.prefix + t[::-1]).encode() for t in text], dtype=object)}
'''


def write_user_model(target_dir: Path) -> Path:
    """A model directory with model-settings.json naming a class in the dir's model.py."""
    import json

    target_dir.mkdir(parents=True, exist_ok=True)
    (target_dir / "model.py").write_text(USER_MODEL_PY)
    (target_dir / "model-settings.json").write_text(
        json.dumps({"name": "reverse", "implementation": "model.Reverse", "parameters": {"extra": {"prefix": ">"}}})
    )
    return target_dir


WRITERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "sklearn": ("mnist-svm.joblib", write_sklearn),
    "xgboost": ("digits-xgb.json", write_xgboost),
    "lightgbm": ("digits-lgb.txt", write_lightgbm),
    "onnx": ("digits-logreg.onnx", write_onnx),
}
