"""Kind: real server. Pulls from Azure Blob Storage through the official client against a real
Azurite process (npm's azurite, blob service only, on 127.0.0.1 at a port it picks, in memory,
stopped at the end), with storage-config entries of ModelMesh's azure form: a connection string,
or no credential for a public container (+ endpoint_url, meshserve's, for Azurite's account URL)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.sink import DigestError
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import parse_secret
from meshserve_testing.storage_servers import AZURITE_ACCOUNT, azurite, azurite_connection_string

blob = pytest.importorskip("azure.storage.blob", reason="azure-storage-blob is a dependency of meshserve: run `make install`")

BODY = b"azure-model-bytes" * 2000


@pytest.fixture(scope="module")
def account(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with azurite(tmp_path_factory.mktemp("azurite")) as url:
        svc = blob.BlobServiceClient.from_connection_string(azurite_connection_string(url))
        private = svc.create_container("models")
        private.upload_blob("sklearn/mnist.joblib", BODY)
        private.upload_blob("mlserver/iris/model.joblib", b"m" * 10)
        private.upload_blob("mlserver/iris/model-settings.json", b"{}")
        private.upload_blob("mlserver/iris/sub/extra.txt", b"x")
        private.upload_blob("big.bin", b"\0" * 300_000)
        svc.create_container("public", public_access="container").upload_blob("m.txt", b"public container")
        yield url


def _fetcher(tmp_path: Path, entries: dict[str, dict], **kw: int) -> Fetcher:
    stores = parse_secret({k: json.dumps(v) for k, v in entries.items()})
    return Fetcher(tmp_path / "pvc", stores, DiskCache(tmp_path / "cache", 1 << 30), **kw)


def test_connection_string_object_prefix_and_cache(tmp_path: Path, account: str) -> None:
    entry = {"type": "azure", "account_name": AZURITE_ACCOUNT, "container": "models", "connection_string": azurite_connection_string(account)}
    f = _fetcher(tmp_path, {"azureModels": entry, "default": entry})
    p = asyncio.run(f.fetch({"key": "azureModels", "path": "sklearn/mnist.joblib"}))
    assert p.name == "mnist.joblib" and p.read_bytes() == BODY and f.downloads == 1
    assert asyncio.run(f.fetch({"key": "azureModels", "path": "sklearn/mnist.joblib"})) == p and f.downloads == 1
    d = asyncio.run(f.fetch({"path": "mlserver/iris"}))  # the default entry; a prefix is a model directory
    assert sorted(str(q.relative_to(d)) for q in d.rglob("*") if q.is_file() and not q.name.startswith(".meshserve")) == [
        "model-settings.json", "model.joblib", "sub/extra.txt"]
    # parameters.container picks another container with the same credentials
    assert asyncio.run(f.fetch({"key": "azureModels", "path": "m.txt", "parameters": {"container": "public"}})).read_bytes() == b"public container"


def test_anonymous_public_container(tmp_path: Path, account: str) -> None:
    anon = {"type": "azure", "account_name": AZURITE_ACCOUNT, "container": "public", "endpoint_url": account}
    f = _fetcher(tmp_path, {"pub": anon, "priv": {**anon, "container": "models"}})
    assert asyncio.run(f.fetch({"key": "pub", "path": "m.txt"})).read_bytes() == b"public container"
    with pytest.raises(StorageError, match="needs a connection_string or a service principal"):
        asyncio.run(f.fetch({"key": "priv", "path": "sklearn/mnist.joblib"}))


def test_digest_limit_and_errors(tmp_path: Path, account: str) -> None:
    cs = azurite_connection_string(account)
    entry = {"type": "azure", "account_name": AZURITE_ACCOUNT, "container": "models", "connection_string": cs}
    wrong_key = cs.replace("AccountKey=Eby8", "AccountKey=AAAA")
    f = _fetcher(tmp_path, {"a": entry, "noc": {**entry, "container": "no-such-container"},
                            "badkey": {**entry, "connection_string": wrong_key}}, max_model_bytes=100_000)
    good = hashlib.sha256(BODY).hexdigest()
    assert asyncio.run(f.fetch({"key": "a", "path": "sklearn/mnist.joblib", "parameters": {"sha256": good}})).exists()
    with pytest.raises(DigestError, match="sha256 is"):
        asyncio.run(f.fetch({"key": "a", "path": "sklearn/mnist.joblib", "parameters": {"sha256": "0" * 64}}))
    with pytest.raises(StorageError, match="over the limit"):
        asyncio.run(f.fetch({"key": "a", "path": "big.bin"}))
    with pytest.raises(StorageError, match="no such object or prefix"):
        asyncio.run(f.fetch({"key": "a", "path": "nope/nothing"}))
    with pytest.raises(StorageError, match="ContainerNotFound; check the container name"):
        asyncio.run(f.fetch({"key": "noc", "path": "m.txt"}))
    with pytest.raises(StorageError, match="(AuthorizationFailure|AuthenticationFailed|403).*connection_string"):
        asyncio.run(f.fetch({"key": "badkey", "path": "sklearn/mnist.joblib"}))
    assert not list((tmp_path / "cache").glob(".tmp-*")), "no temporaries left behind"


def test_registration_predicts_from_the_listing(tmp_path: Path, account: str) -> None:
    """Issue 19 §2: the size placement books before the first load, from the blobs' sizes
    (meshserve_loader/predict.py); nothing is downloaded."""
    from meshserve.model import ModelSpec
    from meshserve_loader.predict import Predictor
    from meshserve_loader.storage import from_disk

    entry = {"type": "azure", "account_name": AZURITE_ACCOUNT, "container": "models", "connection_string": azurite_connection_string(account)}
    stores = parse_secret({"a": json.dumps(entry)})
    one = ModelSpec(id="one__isvc-1", alias="one", format="sklearn", storage={"key": "a", "path": "sklearn/mnist.joblib"})
    folder = ModelSpec(id="dir__isvc-1", alias="dir", format="mlserver", storage={"key": "a", "path": "mlserver/iris"})
    got = asyncio.run(Predictor(tmp_path / "pvc", stores)([one, folder]))
    assert got == {one.id: from_disk(len(BODY)), folder.id: from_disk(10 + 2 + 1)}
