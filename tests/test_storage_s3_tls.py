"""Kind: real server. ModelMesh's `certificate` for a private S3 endpoint: a moto server process
behind TLS with a certificate from a CA made for the test (not in the system's trust store);
and the storage-config re-read when the mounted Secret changes, with no restart, through the
loader's own wiring (make_fetcher, the agent's load path; real Valkey, real moto)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import StorageConfigSource, parse_secret
from meshserve_testing.storage_servers import ServerCA, make_ca, moto_server

boto3 = pytest.importorskip("boto3", reason="boto3 is a dependency of meshserve: run `make install`")

KEY_ID, SECRET = "AKIAMESHSERVETEST", "meshserve-secret"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ServerCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_s3(ca: ServerCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tls=ca) as url:
        bundle = tmp_path_factory.mktemp("bundle") / "ca.pem"
        bundle.write_text(ca.ca_pem)
        c = boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1", verify=str(bundle))
        c.create_bucket(Bucket="models")
        c.put_object(Bucket="models", Key="sklearn/mnist.joblib", Body=b"private-endpoint" * 100)
        yield url


def _entry(url: str, **kw: str) -> dict[str, str]:
    return {"type": "s3", "access_key_id": KEY_ID, "secret_access_key": SECRET, "endpoint_url": url, "region": "us-east-1", "bucket": "models", **kw}


def test_certificate_trusts_a_private_ca(tmp_path: Path, ca: ServerCA, tls_s3: str) -> None:
    other = make_ca(tmp_path / "other")  # a CA that did not sign the server's certificate
    stores = parse_secret({"withCA": json.dumps(_entry(tls_s3, certificate=ca.ca_pem)),
                           "noCA": json.dumps(_entry(tls_s3)),
                           "wrongCA": json.dumps(_entry(tls_s3, certificate=other.ca_pem))})

    def fetch(key: str) -> Path:  # a cache each: the same object must not come from a cache
        f = Fetcher(tmp_path / "pvc", stores, DiskCache(tmp_path / f"cache-{key}", 1 << 30))
        return asyncio.run(f.fetch({"key": key, "path": "sklearn/mnist.joblib"}))

    assert fetch("withCA").read_bytes() == b"private-endpoint" * 100
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="TLS certificate verification failed.*set 'certificate' in storage-config key 'noCA'"):
        fetch("noCA")
    assert time.monotonic() - t0 < 30, "a certificate failure is reported promptly"
    with pytest.raises(StorageError, match="the 'certificate' in storage-config key 'wrongCA' did not verify the endpoint"):
        fetch("wrongCA")


def _mount(d: Path, entries: dict[str, str]) -> None:
    """Write `entries` as the kubelet updates a Secret volume: a new `..<timestamp>` dir, the
    `..data` symlink swapped to it in one rename, key files that are symlinks through `..data`."""
    d.mkdir(exist_ok=True)
    ts = d / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    ts.mkdir()
    for k, v in entries.items():
        (ts / k).write_text(v)
    (d / "..data_tmp").symlink_to(ts.name)
    os.replace(d / "..data_tmp", d / "..data")
    for k in entries:
        if not (d / k).is_symlink():
            (d / k).symlink_to(f"..data/{k}")


async def test_agent_picks_up_a_changed_secret_without_restart(tmp_path: Path, ca: ServerCA, tls_s3: str) -> None:
    """The issue's case end to end in the loader: the mounted Secret first has a gcs entry it
    can't use and an s3 entry without the certificate; loads fail with those reasons, and after
    the Secret is fixed (symlink swap, as Kubernetes does) the next load pulls, same agent."""
    from meshserve_testing import devmesh
    from meshserve.store import keys
    from meshserve.store import State
    from meshserve.model import ModelSpec, Pod
    from meshserve.settings import Settings
    from meshserve_loader.agent import Agent
    from meshserve_testing.fake_runtime import RecordingRuntime

    secret = tmp_path / "storage-config"
    _mount(secret, {"gcsHalf": json.dumps({"type": "gcs", "client_email": "sa@p"}), "private": json.dumps(_entry(tls_s3))})
    with devmesh.valkey() as v:
        s = Settings(data_dir=tmp_path, redis_url=v.url, storage_config=str(secret))
        state = State.from_url(v.url)
        rt = RecordingRuntime()
        a = Agent(s, Pod("pod-0", "127.0.0.1", 1, 2, 1 << 30, ["sklearn"]), rt, state)
        spec = ModelSpec(id="mnist__isvc-0000000001", alias="mnist", format="sklearn", storage={"key": "private", "path": "sklearn/mnist.joblib"})
        with pytest.raises(StorageError, match="set 'certificate'"):
            await a._load(spec)
        # Through the order path: a failed load event carrying the reason, for placement's status.
        await a.register()
        gspec = ModelSpec(id="g__isvc-0000000001", alias="g", format="sklearn", storage={"key": "gcsHalf", "path": "m.joblib"})
        await a._handle(b"1-1", {b"op": b"load", b"model": gspec.id.encode(), b"spec": gspec.to_json().encode()})
        events = [{k.decode(): v.decode() for k, v in f.items()} for _, f in await state.r.xrange(keys.EVENTS)]
        failed = [e for e in events if e.get("op") == "load" and e.get("model") == gspec.id]
        assert failed and failed[0]["ok"] == "0" and "'gcsHalf' (gcs): give both private_key and client_email" in failed[0]["reason"]
        _mount(secret, {"gcsHalf": json.dumps({"type": "gcs", "client_email": "sa@p"}), "private": json.dumps(_entry(tls_s3, certificate=ca.ca_pem))})
        await a._load(spec)
        assert Path(rt.paths[0]).read_bytes() == b"private-endpoint" * 100
        assert a.fetcher.config is not None and a.fetcher.config.reloads == 1
        await state.close()


def test_reload_costs_little_when_nothing_changed(tmp_path: Path) -> None:
    """The check before each pull is stat calls only: measured here for a 10-key mounted Secret."""
    d = tmp_path / "sc"
    _mount(d, {f"k{i}": json.dumps(_entry("http://127.0.0.1:1")) for i in range(10)})
    src = StorageConfigSource(d)
    src.current()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        src.current()
    per = (time.perf_counter() - t0) / n
    print(f"storage-config unchanged check: {per * 1e6:.0f} us for 10 keys")
    assert src.reloads == 0 and per < 0.005
