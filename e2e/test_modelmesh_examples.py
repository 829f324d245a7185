"""ModelMesh's own examples, unchanged, served by meshserve from a real S3 server.

Kind: e2e. A whole mesh (real Envoy, Valkey, built-in runtimes) whose mesh-config/ holds
ModelMesh's four example InferenceServices as they are, whose storage-config is ModelMesh's
quickstart Secret (only endpoint_url points at our S3 server, as its README allows), and an
S3 server (moto in server mode, 127.0.0.1) holding the example files under the bucket
modelmesh-example-models. Each example answers through the gateway over REST and gRPC with
what ModelMesh's docs and functional tests expect (kserve/modelmesh-serving fvt/inference.go).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import yaml

from meshserve_testing import devmesh
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "modelmesh-examples"
BUCKET = "modelmesh-example-models"

# ModelMesh's functional tests' mushroom features (fvt/inference.go, mushroomInputData): one
# mushroom, one-hot over 126 columns, by the indices that are 1.
_MUSHROOM_ONES = (0, 8, 18, 20, 23, 33, 35, 38, 41, 52, 55, 64, 68, 76, 85, 87, 91, 94, 101, 105, 116, 121)
MUSHROOM = [1.0 if i in _MUSHROOM_ONES else 0.0 for i in range(126)]


QUICKSTART = """apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: example-sklearn-isvc
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
    serving.kserve.io/secretKey: localMinIO
spec:
  predictor:
    sklearn:
      storageUri: s3://modelmesh-example-models/sklearn/mnist-svm.joblib
"""


@pytest.fixture(scope="module")
def examples() -> Path:
    if not EXAMPLES.exists():
        pytest.skip("../shared/fixtures/modelmesh-examples is not beside the repository")
    return EXAMPLES


@pytest.fixture(scope="module")
def example_mesh(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[devmesh.Mesh]:
    import boto3

    tmp = tmp_path_factory.mktemp("mm-examples")
    with devmesh.s3_server() as endpoint:
        secret = yaml.safe_load((examples / "storage-config.yaml").read_text())
        entry = json.loads(secret["stringData"]["localMinIO"])
        # The quickstart's credentials and bucket as they are; moto takes any credentials.
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=entry["access_key_id"],
                          aws_secret_access_key=entry["secret_access_key"], region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for f in sorted((examples / "bucket").rglob("*")):
            if f.is_file():
                s3.put_object(Bucket=BUCKET, Key=f.relative_to(examples / "bucket").as_posix(), Body=f.read_bytes())
        secret["stringData"]["localMinIO"] = json.dumps({**entry, "endpoint_url": endpoint})
        storage_config = tmp / "storage-config.yaml"
        storage_config.write_text(yaml.safe_dump(secret))
        config = tmp / "mesh-config"
        config.mkdir()
        for f in (examples / "isvcs").glob("*.yaml"):
            shutil.copy(f, config / f.name)  # unchanged
        # ModelMesh's quickstart InferenceService (docs/quickstart.md): the legacy
        # predictor.sklearn form, a storageUri and the secretKey annotation.
        (config / "quickstart.yaml").write_text(QUICKSTART)
        # A Predictor of ModelMesh's examples, under another name beside the InferenceService.
        pred = yaml.safe_load((examples / "predictors" / "example-mlserver-sklearn-mnist-predictor.yaml").read_text())
        pred["metadata"]["name"] = "predictor-sklearn-mnist-svm"
        (config / "predictor.yaml").write_text(yaml.safe_dump(pred))
        with devmesh.mesh(config_dir=config, pods=2, storage_config=storage_config) as m:
            yield m


def _rest(m: devmesh.Mesh, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(m.rest + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=150) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def _v2(name: str, shape: list[int], data: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]}


def _grpc(m: devmesh.Mesh, model: str, name: str, shape: list[int], data: list[float]) -> pb.ModelInferResponse:
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=name, datatype="FP32", shape=shape)
    t.contents.fp32_contents.extend(data)
    with grpc.insecure_channel(m.grpc) as ch:
        return pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=[("mm-vmodel-id", model)], timeout=150)


def _first(out: pb.ModelInferResponse) -> float:
    o = out.outputs[0]
    for field in ("fp64_contents", "fp32_contents", "int64_contents", "int_contents"):
        vals = list(getattr(o.contents, field))
        if vals:
            return float(vals[0])
    raise AssertionError(f"no values in {o}")


def _digits() -> list[float]:
    doc = json.loads((EXAMPLES.parent / "mnist-request-v2-rest.json").read_text())
    return [float(x) for x in doc["inputs"][0]["data"]]


def test_every_example_answers_over_rest_and_grpc(example_mesh: devmesh.Mesh) -> None:
    m = example_mesh
    log = lambda: m.log()[-4000:]  # noqa: E731 - for failure messages only

    # sklearn digits SVM: 8.
    code, doc = _rest(m, "/v2/models/example-sklearn-mnist-svm/infer", _v2("predict", [1, 64], _digits()))
    assert code == 200, f"{doc}\n{log()}"
    assert doc["model_name"].startswith("example-sklearn-mnist-svm__isvc-") and doc["outputs"][0]["data"] == [8]
    out = _grpc(m, "example-sklearn-mnist-svm", "predict", [1, 64], _digits())
    assert list(out.outputs[0].contents.int64_contents) == [8]

    # The same model through the quickstart's legacy form and through a Predictor.
    for model, kind in (("example-sklearn-isvc", "isvc"), ("predictor-sklearn-mnist-svm", "ksp")):
        code, doc = _rest(m, f"/v2/models/{model}/infer", _v2("predict", [1, 64], _digits()))
        assert code == 200, f"{model}: {doc}\n{log()}"
        assert doc["model_name"].startswith(f"{model}__{kind}-") and doc["outputs"][0]["data"] == [8]
        assert list(_grpc(m, model, "predict", [1, 64], _digits()).outputs[0].contents.int64_contents) == [8]

    # XGBoost and LightGBM mushroom: class 0.0, rounded to 0.1 as ModelMesh's tests round.
    for model in ("example-xgboost-mushroom", "example-lightgbm-mushroom"):
        code, doc = _rest(m, f"/v2/models/{model}/infer", _v2("predict", [1, 126], MUSHROOM))
        assert code == 200, f"{model}: {doc}\n{log()}"
        assert round(float(doc["outputs"][0]["data"][0]), 1) == 0.0, doc
        assert round(_first(_grpc(m, model, "predict", [1, 126], MUSHROOM)), 1) == 0.0

    # ONNX MNIST: metadata names input Input3, FP32, [1, 1, 28, 28]; an image is answered.
    code, md = _rest(m, "/v2/models/example-onnx-mnist")
    assert code == 200, f"{md}\n{log()}"
    assert md["inputs"][0] == {"name": "Input3", "datatype": "FP32", "shape": [1, 1, 28, 28]}, md
    image = [0.0] * 784
    code, doc = _rest(m, "/v2/models/example-onnx-mnist/infer", _v2("Input3", [1, 1, 28, 28], image))
    assert code == 200 and doc["outputs"], f"{doc}\n{log()}"
    out = _grpc(m, "example-onnx-mnist", "Input3", [1, 1, 28, 28], image)
    assert out.model_name.startswith("example-onnx-mnist__isvc-") and out.outputs
    with grpc.insecure_channel(m.grpc) as ch:
        meta = pbg.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name="example-onnx-mnist"),
                                                              metadata=[("mm-vmodel-id", "example-onnx-mnist")], timeout=60)
    assert (meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == ("Input3", "FP32", [1, 1, 28, 28])

    # A wrong shape is INVALID_ARGUMENT, as ModelMesh's README says.
    with pytest.raises(grpc.RpcError) as e:
        _grpc(m, "example-xgboost-mushroom", "predict", [1, 3], [0.0, 1.0, 0.0])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
