"""The text encoder's forward pass (BERT: embeddings, then self-attention and feed-forward
layers) as one ONNX graph, run by onnxruntime on the calling thread.

Why not numpy: the float32 numpy pass (one BLAS call per linear layer, q/k/v stacked) took 9–10
ms for a 12-token text on this machine; the same graph in onnxruntime 2.9–3.1 ms, equal to 1e-7
(side by side, one thread each, docs/design/adapters.md "The forward pass"). Most of it is
onnxruntime packing the weights once for its GEMM kernels: with prepacking off it took 6.6–7.6 ms.

LoRA adapters share the one session. Every linear layer of every encoder layer has a low-rank
term whose matrices are inputs: `x @ la @ lb` with la = (scale A)^T [in, r] and lb = B^T [r, out]
(PEFT's A [r, in] and B [out, r]); r is free per call. A layer an adapter leaves alone, and the
base itself, get rank-1 zeros (`zero_lora`). So one copy of the base's weights serves the base
and all its adapters, whatever layers each adapts.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from meshserve.extras import needs

with needs("runtime", "the text encoder (sentence-transformers models and their adapters)"):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

# The linear layers of one encoder layer, by their name under `encoder.layer.<i>.`.
LINEAR = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "intermediate.dense", "output.dense")
_QKV = LINEAR[:3]


def lora_names(layer: int, module: str) -> tuple[str, str]:
    """The graph's two inputs for the low-rank term of `module` in encoder layer `layer`."""
    return f"la.{layer}.{module}", f"lb.{layer}.{module}"


class _Graph:
    """Builds the node list; each helper returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        self.inits.append(numpy_helper.from_array(arr if arr.ndim == 0 else np.ascontiguousarray(arr), name))
        return name

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        out = f"{kind.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out


def build_session(w: Mapping[str, np.ndarray], layers: int, hidden: int, heads: int, eps: float) -> ort.InferenceSession:
    """The encoder of the BERT weights `w` (Hugging Face names) as a session. Inputs: ids, mask,
    types (int64 [n, t]) and every `lora_names` pair; output `hidden` [n x t, hidden]."""
    g = _Graph()
    f32 = lambda name: np.ascontiguousarray(w[name], dtype=np.float32)  # noqa: E731
    d = hidden // heads
    # [n, t] -> the shapes the attention reshapes to, from the ids' own shape.
    nt = g.op("Shape", "ids")
    qkv_shape = g.op("Concat", nt, g.const("qkv_tail", [3, heads, d], np.int64), axis=0)
    flat = g.const("flat", [-1, hidden], np.int64)
    t1 = g.op("Slice", nt, g.const("i1", [1], np.int64), g.const("i2", [2], np.int64))
    pos = g.op("Slice", g.const("pos_emb", f32("embeddings.position_embeddings.weight")), g.const("i0", [0], np.int64), t1,
               g.const("ax0", [0], np.int64))
    x = g.op("Add", g.op("Gather", g.const("word_emb", f32("embeddings.word_embeddings.weight")), "ids"), pos)
    x = g.op("Add", x, g.op("Gather", g.const("type_emb", f32("embeddings.token_type_embeddings.weight")), "types"))
    x = g.op("LayerNormalization", x, g.const("emb_ln_w", f32("embeddings.LayerNorm.weight")),
             g.const("emb_ln_b", f32("embeddings.LayerNorm.bias")), axis=-1, epsilon=eps)
    x = g.op("Reshape", x, flat)  # [m, hidden]: every linear layer is one GEMM over all tokens
    # Padding takes no attention: -1e9 on its keys, [n, 1, 1, t].
    mask = g.op("Unsqueeze", g.op("Mul", g.op("Sub", g.const("one", 1.0), g.op("Cast", "mask", to=TensorProto.FLOAT)),
                                  g.const("minus_inf", -1e9)), g.const("ax12", [1, 2], np.int64))
    scale, inv_sqrt2, half = g.const("scale", 1.0 / np.sqrt(d)), g.const("inv_sqrt2", 1.0 / np.sqrt(2.0)), g.const("half", 0.5)
    lora_inputs: list[str] = []

    def lora(i: int, module: str, xin: str) -> str:
        la, lb = lora_names(i, module)
        lora_inputs.extend((la, lb))
        return g.op("MatMul", g.op("MatMul", xin, la), lb)

    def linear(i: int, module: str, xin: str, weight: np.ndarray, bias: np.ndarray) -> str:
        p = f"encoder.layer.{i}.{module}"
        y = g.op("Gemm", xin, g.const(p + ".weight", weight), g.const(p + ".bias", bias), transB=1)
        return g.op("Add", y, lora(i, module, xin))

    for i in range(layers):
        p = f"encoder.layer.{i}."
        qkv_w = np.concatenate([f32(p + m + ".weight") for m in _QKV])
        qkv_b = np.concatenate([f32(p + m + ".bias") for m in _QKV])
        r = g.op("Gemm", x, g.const(p + "qkv.weight", qkv_w), g.const(p + "qkv.bias", qkv_b), transB=1)
        r = g.op("Add", r, g.op("Concat", *(lora(i, m, x) for m in _QKV), axis=1))
        r = g.op("Transpose", g.op("Reshape", r, qkv_shape), perm=[2, 0, 3, 1, 4])  # [3, n, heads, t, d]
        q, k, v = (g.op("Gather", r, g.const(f"{p}pick{j}", j, np.int64), axis=0) for j in range(3))
        s = g.op("Add", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale), mask)
        ctx = g.op("MatMul", g.op("Softmax", s, axis=-1), v)  # [n, heads, t, d]
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), flat)
        o = linear(i, "attention.output.dense", ctx, f32(p + "attention.output.dense.weight"), f32(p + "attention.output.dense.bias"))
        x = g.op("LayerNormalization", g.op("Add", o, x), g.const(p + "ln1.w", f32(p + "attention.output.LayerNorm.weight")),
                 g.const(p + "ln1.b", f32(p + "attention.output.LayerNorm.bias")), axis=-1, epsilon=eps)
        h = linear(i, "intermediate.dense", x, f32(p + "intermediate.dense.weight"), f32(p + "intermediate.dense.bias"))
        gelu = g.op("Mul", g.op("Mul", h, half), g.op("Add", g.const(f"{p}one", 1.0), g.op("Erf", g.op("Mul", h, inv_sqrt2))))
        o = linear(i, "output.dense", gelu, f32(p + "output.dense.weight"), f32(p + "output.dense.bias"))
        x = g.op("LayerNormalization", g.op("Add", o, x), g.const(p + "ln2.w", f32(p + "output.LayerNorm.weight")),
                 g.const(p + "ln2.b", f32(p + "output.LayerNorm.bias")), axis=-1, epsilon=eps)
    g.nodes.append(helper.make_node("Identity", [x], ["hidden"]))
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["n", "t"]) for n in ("ids", "mask", "types")]
    low = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["in" if n.startswith("la") else "r", "r" if n.startswith("la") else "out"])
           for n in lora_inputs]
    graph = helper.make_graph(g.nodes, "text-encoder", ints + low, [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["m", hidden])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime >= 1.18 reads
    so = ort.SessionOptions()
    # One thread, the caller's: the runtime runs one inference per CPU already (table.py), and
    # a pool inside each would fight them for the same cores.
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # its warnings about unused constants are not the user's business
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def zero_lora(w: Mapping[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """Rank-1 zeros for every low-rank input: the base, or the layers an adapter leaves alone."""
    out: dict[str, np.ndarray] = {}
    for i in range(layers):
        for m in LINEAR:
            rows, cols = w[f"encoder.layer.{i}.{m}.weight"].shape  # [out, in]
            la, lb = lora_names(i, m)
            out[la], out[lb] = np.zeros((cols, 1), np.float32), np.zeros((1, rows), np.float32)
    return out
