"""Issue 14, item 9: an InferenceService with spec.transformer (KServe's transformer pattern) in
front of a mesh predictor.

The transformer is the user's kserve.Model subclass (kserve 0.21.0 from PyPI, in a venv of its
own) from mesh-config/examples/digits-transformer, run by `meshserve up` as a local process. It
turns an 8x8 image sent as nested lists into the 64 features of the digits model and calls the
predictor through the gateway, under the derived name `digits-predictor`, so the predictor
loads on first use. The digit in the users' mnist request is an 8.

Kind: e2e. Real Valkey, Envoy, placement, built-in runtime and kserve ModelServer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from meshserve_testing import devmesh
from meshserve_loader.runtime_image import ensure_local_image

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
IMAGE = "registry.example/digits-transformer:latest"
IMAGE_DIR = REPO / "mesh-config" / "examples" / "digits-transformer"


@pytest.fixture(scope="module")
def transformer_venv() -> Path:
    return ensure_local_image(IMAGE, IMAGE_DIR, None, REPO).python  # what `meshserve up` uses; made once


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* print them) listening on `port`."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out


def _post(url: str, body: dict) -> tuple[str, dict]:
    out = subprocess.run(["curl", "-sS", "-X", "POST", url, "-H", "Content-Type: application/json", "-d", json.dumps(body),
                          "-w", "\n%{http_code}", "--max-time", "150"], capture_output=True, text=True, timeout=180)
    text, _, code = out.stdout.rpartition("\n")
    return code, json.loads(text) if text.startswith("{") else {"raw": text + out.stderr}


def test_transformer_in_front_of_a_mesh_predictor(transformer_venv: Path, fixtures: Path, tmp_path: Path) -> None:
    features = json.loads((fixtures / "mnist-request-v2-rest.json").read_text())["inputs"][0]["data"]
    image = [features[i * 8:(i + 1) * 8] for i in range(8)]  # the users' digit as an 8x8 image
    cfg = tmp_path / "mesh-config"
    cfg.mkdir()
    shutil.copy(IMAGE_DIR / "inferenceservice.yaml", cfg / "digits.yaml")
    with devmesh.mesh(config_dir=cfg, pods=1, runtime_images=f"{IMAGE}={IMAGE_DIR}", timeout=180) as m:
        r = redis.Redis.from_url(m.redis_url)
        try:
            model = r.hget("ms:aliases", "digits-predictor")
            assert model and model.decode().startswith("digits__isvc-") and r.hget("ms:aliases", "digits") is None
            assert not json.loads(r.hget("ms:placements", model) or b"{}"), "nothing loaded before the first request"
            for attempt in ("cold: the predictor loads behind the transformer", "warm"):
                code, doc = _post(f"{m.rest}/v2/models/digits/infer", {"inputs": [{"name": "image", "shape": [8, 8], "datatype": "FP32", "data": image}]})
                assert code == "200", f"{attempt}: {code} {doc}\n{m.log()[-5000:]}"
                assert doc["outputs"][0]["data"] == [8], doc
            assert json.loads(r.hget("ms:placements", model) or b"{}"), "the predictor was loaded through the mesh"
            port = json.loads(r.hget("ms:transformers", "digits"))["rest_port"]
            assert _listening(port) == {"0100007F"}, _listening(port)  # 127.0.0.1: kserve binds 0.0.0.0 itself; the mesh keeps it local
            # The predictor stays reachable by its own name, with the 64 features.
            code, doc = _post(f"{m.rest}/v2/models/digits-predictor/infer", json.loads((fixtures / "mnist-request-v2-rest.json").read_text()))
            assert code == "200" and doc["outputs"][0]["data"] == [8], doc
        finally:
            r.close()
