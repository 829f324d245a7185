"""The example model, made on first run with no download: an SVM trained on scikit-learn's
bundled digits set (the seed's request is one of its rows, and this model predicts 8 for it).

Trained in a short-lived child process (`python -m meshserve.example <file>`): importing
scikit-learn costs ~110 MiB that a process never gives back, and `meshserve up` stays up for
hours after the one training (bench/up_rss.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE_PVC = "my-models-pvc"
EXAMPLE_FILE = "mnist-svm.joblib"


def ensure_example_model(pvc_root: Path) -> Path:
    target = pvc_root / EXAMPLE_PVC / EXAMPLE_FILE
    if target.exists():
        return target
    done = subprocess.run([sys.executable, "-m", "meshserve.example", str(target)], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        # The child's last line is the reason (a MissingExtra names the extra to install).
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"could not make the example model: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return target


def train(target: Path) -> None:
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


if __name__ == "__main__":
    train(Path(sys.argv[1]))
