"""Kind: real server. Pulls from Google Cloud Storage through the official client against a real
GCS emulator process (gcp-storage-emulator on 127.0.0.1, stopped at the end), with a storage-config
entry of ModelMesh's gcs form (+ endpoint_url, meshserve's, for the emulator); the service account
path against a local OAuth token endpoint standing in for Google's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs

import pytest

from meshserve_testing.devmesh import free_port
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.sink import DigestError
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import parse_secret
from meshserve_testing.storage_servers import gcs_emulator

storage = pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is a dependency of meshserve: run `make install`")

BODY = b"gcs-model-bytes" * 2000


@pytest.fixture(scope="module")
def gcs() -> Iterator[str]:
    from google.auth.credentials import AnonymousCredentials

    with gcs_emulator() as url:
        c = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
        b = c.create_bucket("models")
        b.blob("sklearn/mnist.joblib").upload_from_string(BODY)
        b.blob("mlserver/iris/model.joblib").upload_from_string(b"m" * 10)
        b.blob("mlserver/iris/model-settings.json").upload_from_string(b"{}")
        b.blob("mlserver/iris/sub/extra.txt").upload_from_string(b"x")
        b.blob("big.bin").upload_from_string(b"\0" * 300_000)
        c.create_bucket("other").blob("m.txt").upload_from_string(b"other bucket")
        yield url


def _fetcher(tmp_path: Path, entries: dict[str, dict], **kw: int) -> Fetcher:
    stores = parse_secret({k: json.dumps(v) for k, v in entries.items()})
    return Fetcher(tmp_path / "pvc", stores, DiskCache(tmp_path / "cache", 1 << 30), **kw)


def test_object_prefix_uri_and_cache(tmp_path: Path, gcs: str) -> None:
    entry = {"type": "gcs", "bucket": "models", "endpoint_url": gcs}
    f = _fetcher(tmp_path, {"gcsModels": entry, "default": entry})
    p = asyncio.run(f.fetch({"key": "gcsModels", "path": "sklearn/mnist.joblib"}))
    assert p.name == "mnist.joblib" and p.read_bytes() == BODY and f.downloads == 1
    assert asyncio.run(f.fetch({"key": "gcsModels", "path": "sklearn/mnist.joblib"})) == p and f.downloads == 1  # from the disk cache
    d = asyncio.run(f.fetch({"path": "mlserver/iris"}))  # no key: the default entry; a prefix is a model directory
    assert sorted(str(q.relative_to(d)) for q in d.rglob("*") if q.is_file() and not q.name.startswith(".meshserve")) == [
        "model-settings.json", "model.joblib", "sub/extra.txt"]
    assert asyncio.run(f.fetch({"uri": "gs://other/m.txt"})).read_bytes() == b"other bucket"
    assert asyncio.run(f.fetch({"key": "gcsModels", "path": "m.txt", "parameters": {"bucket": "other"}})).read_bytes() == b"other bucket"


def test_digest_limit_and_errors(tmp_path: Path, gcs: str) -> None:
    entry = {"type": "gcs", "bucket": "models", "endpoint_url": gcs}
    f = _fetcher(tmp_path, {"g": entry, "nob": {**entry, "bucket": "no-such-bucket"}}, max_model_bytes=100_000)
    good = hashlib.sha256(BODY).hexdigest()
    assert asyncio.run(f.fetch({"key": "g", "path": "sklearn/mnist.joblib", "parameters": {"sha256": good}})).exists()
    with pytest.raises(DigestError, match="sha256 is"):
        asyncio.run(f.fetch({"key": "g", "path": "sklearn/mnist.joblib", "parameters": {"sha256": "0" * 64}}))
    with pytest.raises(StorageError, match="over the limit"):
        asyncio.run(f.fetch({"key": "g", "path": "big.bin"}))
    with pytest.raises(StorageError, match="no such object or prefix"):
        asyncio.run(f.fetch({"key": "g", "path": "nope/nothing"}))
    with pytest.raises(StorageError, match="gs://no-such-bucket/.*check the bucket name"):
        asyncio.run(f.fetch({"key": "nob", "path": "m.txt"}))
    assert not list((tmp_path / "cache").glob(".tmp-*")), "no temporaries left behind"


class TokenEndpoint:
    """Google's OAuth token endpoint as a service account uses it: a POST of a JWT signed with
    the account's private key, answered with an access token. Records the grants it saw."""

    def __init__(self) -> None:
        self.grants: list[dict[str, list[str]]] = []
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                ep.grants.append(parse_qs(body))
                out = json.dumps({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def __enter__(self) -> "TokenEndpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_service_account_key_is_used(tmp_path: Path, gcs: str) -> None:
    """private_key + client_email (+ token_uri): the client signs a JWT with the key and trades it
    for a token before reading. A key that isn't one fails with what to copy where."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with TokenEndpoint() as tok:
        entry = {"type": "gcs", "bucket": "models", "endpoint_url": gcs, "client_email": "loader@proj.iam.gserviceaccount.com",
                 "private_key": pem, "token_uri": tok.url}
        f = _fetcher(tmp_path, {"sa": entry})
        assert asyncio.run(f.fetch({"key": "sa", "path": "sklearn/mnist.joblib"})).read_bytes() == BODY
        assert tok.grants and tok.grants[0]["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    bad = _fetcher(tmp_path / "bad", {"sa": {**entry, "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"}})
    with pytest.raises(StorageError, match="private_key is not a usable service account key"):
        asyncio.run(bad.fetch({"key": "sa", "path": "sklearn/mnist.joblib"}))


def test_registration_predicts_from_the_listing(tmp_path: Path, gcs: str) -> None:
    """Issue 19 §2: the size placement books before the first load, from the objects' sizes
    (meshserve_loader/predict.py); nothing is downloaded."""
    from meshserve.model import ModelSpec
    from meshserve_loader.predict import Predictor
    from meshserve_loader.storage import from_disk

    stores = parse_secret({"g": json.dumps({"type": "gcs", "bucket": "models", "endpoint_url": gcs})})
    one = ModelSpec(id="one__isvc-1", alias="one", format="sklearn", storage={"key": "g", "path": "sklearn/mnist.joblib"})
    folder = ModelSpec(id="dir__isvc-1", alias="dir", format="mlserver", storage={"key": "g", "path": "mlserver/iris"})
    missing = ModelSpec(id="no__isvc-1", alias="no", format="sklearn", storage={"key": "g", "path": "nope/nothing"})
    got = asyncio.run(Predictor(tmp_path / "pvc", stores)([one, folder, missing]))
    assert got == {one.id: from_disk(len(BODY)), folder.id: from_disk(10 + 2 + 1)}  # nothing listed: no prediction
