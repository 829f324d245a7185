"""Issue 19 §2: a model registered without a size is booked at a prediction from its stored
files (disk size x 1.25), made at registration, so a pod smaller than the unknown-size default
(64 MiB) takes it. Before, placement refused: "model needs 67108864 bytes, more than the pod's
whole capacity".

Kind: e2e. `meshserve up` (real Valkey, Envoy, placement, loader, runtime) with one 16 MiB pod;
one model on a local path and one in a real S3-compatible server (moto in server mode), neither
stating a size. Requests through the gateway load both.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshserve_testing import devmesh
from meshserve.model import ModelSpec
from meshserve.store import State, keys
from meshserve_loader.storage import predict_size
from meshserve_placement.sizes import UNKNOWN_MODEL_BYTES

pytestmark = pytest.mark.e2e
SVM = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "modelmesh-examples" / "bucket" / "sklearn" / "mnist-svm.joblib"
REQUEST = Path(__file__).resolve().parents[1] / "mesh-config" / "examples" / "requests" / "mnist-request-v2-rest.json"
POD_BYTES = 16 << 20


def _infer(m: devmesh.Mesh, model: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{m.rest}/v2/models/{model}/infer", data=REQUEST.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


async def _specs(url: str) -> dict[str, ModelSpec]:
    state = State.from_url(url)
    try:
        return {s.alias: s for s in (ModelSpec.from_json(raw) for raw in (await state.r.hgetall(keys.MODELS)).values())}
    finally:
        await state.close()


@pytest.mark.timeout(300)
def test_an_unsized_model_fits_a_pod_smaller_than_the_unknown_default(tmp_path: Path) -> None:
    import asyncio

    import boto3

    if not SVM.exists():
        pytest.skip(f"the digits SVM fixture is not at {SVM}")
    assert POD_BYTES < UNKNOWN_MODEL_BYTES
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(SVM, models / "model.joblib")
    with devmesh.s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="svm/model.joblib", Body=SVM.read_bytes())  # a prefix, as a model folder is
        storage_config = tmp_path / "storage-config.yaml"
        entry = {"type": "s3", "access_key_id": "k", "secret_access_key": "s", "endpoint_url": endpoint, "bucket": "models"}
        storage_config.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "storage-config"},
                                                  "stringData": {"store": json.dumps(entry)}}))
        cfg = tmp_path / "config"
        cfg.mkdir()
        (cfg / "models.yaml").write_text(
            devmesh.inference_service("local-svm", "sklearn", devmesh.uri_storage(f"file://{models / 'model.joblib'}"))
            + "---\n"
            + devmesh.inference_service("s3-svm", "sklearn", "      storage:\n        key: store\n        path: svm")
        )
        with devmesh.mesh(config_dir=cfg, pods=1, pod_capacity_bytes=POD_BYTES, model_roots=str(models),
                          storage_config=storage_config) as m:
            specs = asyncio.run(_specs(m.redis_url))
            expected = predict_size(models / "model.joblib", "sklearn")
            assert specs["local-svm"].predicted_size == expected
            assert specs["s3-svm"].predicted_size == expected  # listed, not downloaded: the same bytes
            for name in ("local-svm", "s3-svm"):
                code, body = _infer(m, name)
                assert code == 200, (name, body, m.log()[-3000:])
                assert body["outputs"][0]["data"] == [8]
