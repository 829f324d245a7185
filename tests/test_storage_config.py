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
from meshserve_loader.storage_config import (
    BadStore, Store, StorageConfigError, StorageConfigSource, load_storage_config, parse_secret, parse_store, pick_store,
)

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
        parse_store("a", "{nope")
    with pytest.raises(StorageConfigError, match="type 'ftp' is not one of s3, gcs, azure, http, pvc"):
        pick_store(parse_secret({"a": json.dumps({"type": "ftp"})}), "a")
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
    for bad in ({"uri": "ftp://b/x"}, {"key": "localMinIO", "path": "/abs"}, {"key": "localMinIO", "path": "a/../../b"}, {"path": "x"}):
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


GCS_SA = {"type": "gcs", "bucket": "b", "client_email": "sa@p.iam.gserviceaccount.com",
          "private_key": "-----BEGIN PRIVATE KEY-----\nMIIE...\n-----END PRIVATE KEY-----\n"}
AZURE = {"type": "azure", "account_name": "acct", "container": "models", "connection_string": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"}
CA = "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"


def test_one_bad_entry_spoils_only_its_key() -> None:
    """The issue: one gcs/azure (or broken) entry made every store disappear. Now each entry
    stands alone, and a model naming a bad one gets its reason and what to do."""
    stores = parse_secret({
        "localMinIO": json.dumps(MINIO),
        "ftp": json.dumps({"type": "ftp", "url": "ftp://x"}),
        "broken": "{not json",
        "gcsHalf": json.dumps({"type": "gcs", "client_email": "sa@p"}),
        "gcs": json.dumps(GCS_SA),
        "azure": json.dumps(AZURE),
    })
    assert isinstance(stores["localMinIO"], Store) and isinstance(stores["gcs"], Store) and isinstance(stores["azure"], Store)
    assert {k for k, v in stores.items() if isinstance(v, BadStore)} == {"ftp", "broken", "gcsHalf"}
    assert plan_source({"key": "localMinIO", "path": "m.joblib"}, stores).kind == "s3"
    with pytest.raises(StorageError, match=r"'ftp'.*type 'ftp' is not one of .*re-reads it when it changes"):
        plan_source({"key": "ftp", "path": "m"}, stores)
    with pytest.raises(StorageError, match="'broken' is not JSON"):
        plan_source({"key": "broken", "path": "m"}, stores)
    with pytest.raises(StorageError, match="both private_key and client_email"):
        plan_source({"key": "gcsHalf", "path": "m"}, stores)


def test_secret_data_bad_base64_is_one_bad_key() -> None:
    stores = parse_secret({"kind": "Secret", "data": {"good": base64.b64encode(json.dumps(MINIO).encode()).decode(), "bad": "!!!"}})
    assert isinstance(stores["good"], Store)
    assert isinstance(stores["bad"], BadStore) and "base64" in stores["bad"].reason


@pytest.mark.parametrize("entry, message", [
    ({"type": "azure", "account_name": "a"}, "'container' is required"),
    ({"type": "azure", "container": "c"}, "'account_name' is required"),
    ({"type": "azure", "account_name": "a", "container": "c", "client_id": "i", "tenant_id": "t"}, "missing client_secret"),
    ({"type": "gcs", "private_key": "not pem", "client_email": "e"}, "PEM private key"),
    ({"type": "s3", "certificate": "/etc/ssl/ca.pem"}, "PEM text of the CA bundle"),
    ({"type": "s3", "endpoint_url": "minio:9000"}, "must start with http"),
    ({"type": "s3", "bucket": {"nested": 1}}, "'bucket' must be a string"),
    ({"type": "pvc"}, "needs 'name'"),
    ({"type": "http"}, "needs a 'url'"),
])
def test_entry_checks_say_what_to_fix(entry: dict, message: str) -> None:
    with pytest.raises(StorageConfigError, match=message):
        parse_store("k", json.dumps(entry))


def test_gcs_and_azure_entries_and_sources() -> None:
    stores = parse_secret({"gcs": json.dumps(GCS_SA), "azure": json.dumps(AZURE),
                           "s3ca": json.dumps({**MINIO, "certificate": CA}),
                           "default": json.dumps({"type": "gcs", "bucket": "pub"})})
    g = stores["gcs"]
    assert isinstance(g, Store) and g.client_email.startswith("sa@") and g.private_key.startswith("-----BEGIN")
    assert "PRIVATE" not in json.dumps(g.redacted()) and "AccountKey" not in json.dumps(stores["azure"].redacted())
    assert stores["s3ca"].certificate == CA  # type: ignore[union-attr]
    s = plan_source({"key": "gcs", "path": "dir/model"}, stores)
    assert (s.kind, s.bucket, s.key) == ("gcs", "b", "dir/model")
    assert plan_source({"key": "gcs", "path": "m", "parameters": {"bucket": "o"}}, stores).bucket == "o"
    a = plan_source({"key": "azure", "path": "sk/m.joblib"}, stores)
    assert (a.kind, a.bucket, a.key) == ("azure", "models", "sk/m.joblib")
    assert "acct" in a.cache_id and "AccountKey" not in a.cache_id
    assert plan_source({"key": "azure", "path": "m", "parameters": {"container": "c2"}}, stores).bucket == "c2"
    u = plan_source({"uri": "gs://other/x/y.onnx"}, stores)  # no key: the default entry, a gcs one
    assert (u.kind, u.bucket, u.key, u.store.key) == ("gcs", "other", "x/y.onnx", "default")  # type: ignore[union-attr]
    anon = plan_source({"uri": "gs://pub/m"}, {"default": stores["s3ca"]})  # default is s3: anonymous, as KServe
    assert anon.kind == "gcs" and anon.store is not None and not anon.store.private_key
    bad_default = parse_secret({"default": json.dumps({"type": "gcs", "private_key": "x"})})
    with pytest.raises(StorageError, match="give both private_key and client_email"):  # not silently anonymous
        plan_source({"uri": "gs://b/m"}, bad_default)
    with pytest.raises(StorageError, match="is a azure store, not gcs"):
        plan_source({"uri": "gs://b/m", "key": "azure"}, stores)


def test_unreadable_config_fails_only_models_that_need_it(tmp_path: Path) -> None:
    f = tmp_path / "sc.yaml"
    f.write_text("[1, 2")
    snap = StorageConfigSource(f).current()
    assert snap.error and not snap.stores
    with pytest.raises(StorageError, match="storage-config can't be read: .* not YAML or JSON"):
        plan_source({"key": "localMinIO", "path": "m"}, snap.stores, snap.error)
    assert plan_source({"parameters": {"type": "pvc", "name": "v"}, "path": "m"}, snap.stores, snap.error).kind == "local"
    assert plan_source({"uri": "https://h/m.onnx"}, snap.stores, snap.error).kind == "http"


def _mount_secret(d: Path, entries: dict[str, str], stamp: str) -> None:
    """Lay out `d` as the kubelet does for a Secret volume: the key files are symlinks through
    `..data`, itself a symlink to a `..<timestamp>` dir; an update writes a new timestamp dir and
    swaps `..data` with one rename."""
    import os

    d.mkdir(exist_ok=True)
    ts = d / f"..{stamp}"
    ts.mkdir()
    for k, v in entries.items():
        (ts / k).write_text(v)
    tmp = d / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, d / "..data")
    for k in entries:
        if not (d / k).is_symlink():
            (d / k).symlink_to(f"..data/{k}")


def test_reload_on_symlink_swap_and_file_rewrite(tmp_path: Path) -> None:
    d = tmp_path / "storage-config"
    _mount_secret(d, {"localMinIO": json.dumps(MINIO), "bad": json.dumps({"type": "ftp"})}, "2024_01_01_00_00_00.1")
    src = StorageConfigSource(d)
    first = src.current()
    assert set(first.stores) == {"localMinIO", "bad"} and isinstance(first.stores["bad"], BadStore)
    assert src.current() is first and src.reloads == 0  # nothing changed: no re-read
    _mount_secret(d, {"localMinIO": json.dumps({**MINIO, "bucket": "new"}), "bad": json.dumps({"type": "http", "url": "http://h/"})},
                  "2024_01_01_00_01_00.2")
    second = src.current()
    assert src.reloads == 1 and second.generation == first.generation + 1
    assert second.stores["localMinIO"].bucket == "new" and isinstance(second.stores["bad"], Store)  # type: ignore[union-attr]
    # A plain file replaced (the `meshserve up` form), then made unreadable, then fixed.
    f = tmp_path / "sc.json"
    f.write_text(json.dumps({"default": json.dumps(MINIO)}))
    src = StorageConfigSource(f)
    assert src.current().stores["default"].bucket == MINIO["bucket"]  # type: ignore[union-attr]
    new = tmp_path / "sc.json.new"
    new.write_text(json.dumps({"default": json.dumps({**MINIO, "bucket": "b2"})}))
    new.replace(f)
    assert src.current().stores["default"].bucket == "b2"  # type: ignore[union-attr]
    f.unlink()
    assert "does not exist" in src.current().error
    f.write_text(json.dumps({"default": json.dumps(MINIO)}))
    assert not src.current().error and src.reloads == 3
