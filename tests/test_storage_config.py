"""Kind: unit. The storage-config Secret forms (ModelMesh's JSON-per-key and KServe's aws_* keys),
store selection and source planning: pure functions, no I/O beyond tmp files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from meshserve_loader.fetch import plan_source
from meshserve_loader.storage import StorageError, resolve_local, safe_join
from meshserve_loader.storage_config import StorageConfigError, load_storage_config, parse_secret, pick_store

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
MINIO = {"type": "s3", "access_key_id": "k", "secret_access_key": "SUPERSECRET", "endpoint_url": "http://minio:9000", "region": "us-south", "bucket": "modelmesh-example-models"}


def test_secret_with_data_and_stringdata(tmp_path: Path) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "storage-config"},
              "data": {"localMinIO": base64.b64encode(json.dumps(MINIO).encode()).decode()},
              "stringData": {"default": json.dumps({**MINIO, "bucket": "b2"})}}
    f = tmp_path / "secret.yaml"
    f.write_text(yaml.safe_dump(secret))
    stores = load_storage_config(f)
    assert stores["localMinIO"].bucket == "modelmesh-example-models" and stores["localMinIO"].endpoint_url == "http://minio:9000"
    assert pick_store(stores, None).bucket == "b2"
    assert pick_store(stores, "localMinIO").key == "localMinIO"
    assert "SUPERSECRET" not in json.dumps(stores["localMinIO"].redacted())


def test_mounted_secret_directory(tmp_path: Path) -> None:
    (tmp_path / "localMinIO").write_text(json.dumps(MINIO))
    (tmp_path / "..data").mkdir()  # Kubernetes' own bookkeeping in a mounted Secret
    assert list(load_storage_config(tmp_path)) == ["localMinIO"]


def test_users_kserve_form_fixture_unchanged() -> None:
    if not (FIXTURES / "storage-config-secret.yaml").exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    stores = load_storage_config(FIXTURES / "storage-config-secret.yaml")
    d = pick_store(stores, None)
    assert (d.type, d.access_key_id, d.secret_access_key) == ("s3", "YOUR_ACCESS_KEY", "YOUR_SECRET_KEY")


def test_bad_configs_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match="not JSON"):
        parse_secret({"a": "{nope"})
    with pytest.raises(StorageConfigError, match="type 'gcs' is not one of"):
        parse_secret({"a": json.dumps({"type": "gcs"})})
    with pytest.raises(StorageConfigError, match="no 'default' key"):
        pick_store(parse_secret({"a": json.dumps(MINIO)}), None)
    with pytest.raises(StorageConfigError, match="it has: a"):
        pick_store(parse_secret({"a": json.dumps(MINIO)}), "b")
    with pytest.raises(StorageConfigError, match="MESHSERVE_STORAGE_CONFIG"):
        load_storage_config(tmp_path / "missing.json")
    assert load_storage_config("") == {}


def test_plan_source_forms() -> None:
    stores = parse_secret({"localMinIO": json.dumps(MINIO), "web": json.dumps({"type": "http", "url": "https://h/m/"}),
                           "vol": json.dumps({"type": "pvc", "name": "my-models-pvc"})})
    s = plan_source({"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"}, stores)
    assert (s.kind, s.bucket, s.key) == ("s3", "modelmesh-example-models", "sklearn/mnist-svm.joblib")
    assert plan_source({"key": "localMinIO", "path": "x", "parameters": {"bucket": "b"}}, stores).bucket == "b"
    assert plan_source({"key": "web", "path": "a/m.onnx"}, stores).url == "https://h/m/a/m.onnx"
    assert plan_source({"key": "vol", "path": "m.joblib"}, stores).storage == {"parameters": {"type": "pvc", "name": "my-models-pvc"}, "path": "m.joblib"}
    assert plan_source({"parameters": {"type": "pvc", "name": "v"}, "path": "m"}, {}).kind == "local"
    assert plan_source({"uri": "https://h/x.onnx"}, {}).kind == "http"
    s = plan_source({"uri": "s3://bkt/p/q", "key": "localMinIO"}, stores)
    assert (s.bucket, s.key) == ("bkt", "p/q")
    for bad in ({"uri": "gs://b/x"}, {"key": "localMinIO", "path": "/abs"}, {"key": "localMinIO", "path": "a/../../b"}, {"path": "x"}):
        with pytest.raises(StorageError):
            plan_source(bad, stores)


def test_local_paths_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "pvc"
    (root / "vol").mkdir(parents=True)
    (root / "vol" / "m.joblib").write_bytes(b"x")
    (tmp_path / "secret").write_text("s")
    (root / "vol" / "link").symlink_to(tmp_path / "secret")
    assert resolve_local({"parameters": {"type": "pvc", "name": "vol"}, "path": "m.joblib"}, root).name == "m.joblib"
    for rel, msg in (("../secret", "'..'"), ("/etc/passwd", "relative"), ("link", "symlink")):
        with pytest.raises(StorageError, match=msg):
            safe_join(root / "vol", rel)
    with pytest.raises(StorageError, match="plain volume name"):
        resolve_local({"parameters": {"type": "pvc", "name": "../x"}, "path": "m"}, root)
    with pytest.raises(StorageError, match="does not exist"):
        resolve_local({"parameters": {"type": "pvc", "name": "vol"}, "path": "nope.joblib"}, root)
