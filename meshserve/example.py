"""The example model, made on first run with no download: an SVM trained on scikit-learn's
bundled digits set (the seed's request is one of its rows, and this model predicts 8 for it)."""

from __future__ import annotations

import os
from pathlib import Path

EXAMPLE_PVC = "my-models-pvc"
EXAMPLE_FILE = "mnist-svm.joblib"


def ensure_example_model(pvc_root: Path) -> Path:
    target = pvc_root / EXAMPLE_PVC / EXAMPLE_FILE
    if target.exists():
        return target
    from meshserve.extras import needs

    with needs("runtime", "the example model (an sklearn SVC)"):
        import joblib
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

    digits = load_digits()
    model = SVC(gamma=0.001).fit(digits.data, digits.target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    joblib.dump(model, tmp)
    os.replace(tmp, target)  # atomic: a half-written model is never visible
    return target
