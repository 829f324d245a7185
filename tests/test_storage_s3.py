"""Kind: real server. Pulls from a real S3-compatible server process (moto in server mode on
127.0.0.1, stopped at the end), with credentials from a storage-config in the ModelMesh form."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_testing.devmesh import s3_server
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.sink import DigestError, SizeLimitError
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import load_storage_config

boto3 = pytest.importorskip("boto3", reason="boto3 is a dependency of meshserve: run `make install`")

KEY_ID, SECRET = "AKIAMESHSERVETEST", "meshserve-secret"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as url:
        yield url


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    c = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1")
    c.create_bucket(Bucket="models")
    c.put_object(Bucket="models", Key="sklearn/mnist-svm.joblib", Body=b"joblib-bytes" * 1000)
    c.put_object(Bucket="models", Key="mlserver/iris/model.joblib", Body=b"m" * 10)
    c.put_object(Bucket="models", Key="mlserver/iris/model-settings.json", Body=b"{}")
    c.put_object(Bucket="models", Key="mlserver/iris/sub/extra.txt", Body=b"x")
    c.put_object(Bucket="models", Key="evil/../../escape.txt", Body=b"x")
    c.put_object(Bucket="models", Key="big.bin", Body=b"\0" * 300_000)
    c.create_bucket(Bucket="other")
    c.put_object(Bucket="other", Key="m.txt", Body=b"other bucket")
    return "models"


def _config(tmp_path: Path, endpoint: str, **overrides: str) -> Path:
    entry = {"type": "s3", "access_key_id": KEY_ID, "secret_access_key": SECRET, "endpoint_url": endpoint,
             "region": "us-east-1", "bucket": "models", **overrides}
    f = tmp_path / "storage-config.json"
    f.write_text(json.dumps({"localMinIO": json.dumps(entry), "default": json.dumps(entry)}))
    return f


def _fetcher(tmp_path: Path, cfg: Path, **kw: int) -> Fetcher:
    return Fetcher(tmp_path / "pvc", load_storage_config(cfg), DiskCache(tmp_path / "cache", kw.pop("cache", 1 << 30)), **kw)


def test_single_object_by_key_then_cache_hit(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    """The users' form: storage.key + path. The second pull (a reload after eviction) comes from disk."""
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint))
    p = asyncio.run(f.fetch({"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"}))
    assert p.name == "mnist-svm.joblib" and p.read_bytes() == b"joblib-bytes" * 1000
    assert f.downloads == 1
    p2 = asyncio.run(f.fetch({"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"}))
    assert p2 == p and f.downloads == 1
    assert not list((tmp_path / "cache").glob(".tmp-*")), "no temporaries left behind"


def test_prefix_is_a_model_directory(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint))
    d = asyncio.run(f.fetch({"path": "mlserver/iris"}))  # no key: the `default` entry
    assert d.is_dir()
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and not p.name.startswith(".meshserve")) == [
        "model-settings.json", "model.joblib", "sub/extra.txt"]


def test_s3_uri_and_bucket_parameter(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint))
    assert asyncio.run(f.fetch({"uri": "s3://other/m.txt"})).read_bytes() == b"other bucket"
    assert asyncio.run(f.fetch({"key": "localMinIO", "path": "m.txt", "parameters": {"bucket": "other"}})).read_bytes() == b"other bucket"


def test_sha256_checked(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint))
    good = hashlib.sha256(b"joblib-bytes" * 1000).hexdigest()
    p = asyncio.run(f.fetch({"path": "sklearn/mnist-svm.joblib", "parameters": {"sha256": f"sha256:{good}"}}))
    assert p.exists()
    with pytest.raises(DigestError, match="sha256 is"):
        asyncio.run(f.fetch({"path": "sklearn/mnist-svm.joblib", "parameters": {"sha256": "0" * 64}}))
    assert not list((tmp_path / "cache").glob(".tmp-*")), "a corrupt download is not kept"


def test_size_limit(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint), max_model_bytes=100_000)
    with pytest.raises(StorageError, match="over the limit"):
        asyncio.run(f.fetch({"path": "big.bin"}))


def test_errors_say_what_to_fix(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint))
    with pytest.raises(StorageError, match="no such object or prefix"):
        asyncio.run(f.fetch({"path": "nope/nothing"}))
    with pytest.raises(StorageError, match="'nokey' is not in the storage-config"):
        asyncio.run(f.fetch({"key": "nokey", "path": "x"}))
    with pytest.raises(StorageError, match="no '..'"):
        asyncio.run(f.fetch({"path": "../models/x"}))
    with pytest.raises(StorageError, match="must not contain '..'"):
        asyncio.run(f.fetch({"path": "evil"}))  # an object name with .. inside the prefix
    bad = _fetcher(tmp_path / "bad", _config(tmp_path, s3_endpoint, bucket="no-such-bucket"))
    with pytest.raises(StorageError, match="NoSuchBucket"):
        asyncio.run(bad.fetch({"path": "m.txt"}))


def test_disk_cache_limit_evicts_lru(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    f = _fetcher(tmp_path, _config(tmp_path, s3_endpoint), cache=250_000)
    a = asyncio.run(f.fetch({"path": "sklearn/mnist-svm.joblib"}))
    b = asyncio.run(f.fetch({"path": "big.bin"}))  # 300 KB: over the limit alone, so `a` goes
    assert b.exists() and not a.exists()
    assert f.cache.used_bytes() >= 300_000


async def test_agent_loads_from_s3_with_storage_config_setting(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    """The agent's wiring: MESHSERVE_STORAGE_CONFIG -> storage-config -> S3 pull -> the runtime
    gets a local path to the pulled file (real Valkey, real moto; the runtime is an in-memory fake)."""
    from meshserve_testing import devmesh
    from meshserve.store import State
    from meshserve.model import ModelSpec, Pod
    from meshserve.settings import Settings
    from meshserve_loader.agent import Agent
    from meshserve_testing.fake_runtime import RecordingRuntime

    with devmesh.valkey() as v:
        s = Settings(data_dir=tmp_path, redis_url=v.url, storage_config=str(_config(tmp_path, s3_endpoint)))
        state = State.from_url(v.url)
        rt = RecordingRuntime()
        a = Agent(s, Pod("pod-0", "127.0.0.1", 1, 2, 1 << 30, ["sklearn"]), rt, state)
        spec = ModelSpec(id="mnist__isvc-0000000001", alias="mnist", format="sklearn", storage={"key": "localMinIO", "path": "sklearn/mnist-svm.joblib"})
        size, predicted = await a._load(spec)
        assert Path(rt.paths[0]).read_bytes() == b"joblib-bytes" * 1000
        assert size == predicted > 12000  # the runtime measured nothing: the prediction is reported
        await state.close()
