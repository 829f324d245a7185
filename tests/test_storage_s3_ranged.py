"""Kind: real servers. S3 pulls as concurrent ranged GETs (s3transfer) against a real moto
server process on 127.0.0.1 (stopped at the end): the bytes are whole, the GETs really are
ranged and in flight on several threads, progress reaches the total, the size limit still stops
a pull mid-way, and a loader killed mid-pull leaves only its staging dir, removed on restart.

The part size is made small (256 KiB) so a few-MiB object is many parts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshserve_testing.devmesh import s3_server
from meshserve_loader import pull_s3
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.sink import DigestError, SizeLimitError
from meshserve_loader.storage_config import load_storage_config

boto3 = pytest.importorskip("boto3", reason="boto3 is a dependency of meshserve: run `make install`")

KEY_ID, SECRET = "AKIAMESHSERVETEST", "meshserve-secret"
PART = 256 << 10
BIG = os.urandom(3 << 20) + b"tail"  # 12 full parts and a 4-byte one


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="us-east-1")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3_server() as url:
        c = _client(url)
        c.create_bucket(Bucket="models")
        c.put_object(Bucket="models", Key="big/model.bin", Body=BIG)
        yield url


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_s3, "PART_BYTES", PART)
    monkeypatch.setattr(pull_s3, "CONCURRENCY", 4)


def _config(tmp_path: Path, endpoint: str) -> Path:
    entry = {"type": "s3", "access_key_id": KEY_ID, "secret_access_key": SECRET, "endpoint_url": endpoint, "region": "us-east-1", "bucket": "models"}
    f = tmp_path / "storage-config.json"
    f.write_text(json.dumps({"default": json.dumps(entry)}))
    return f


def _fetcher(tmp_path: Path, endpoint: str, **kw: int) -> Fetcher:
    return Fetcher(tmp_path / "pvc", load_storage_config(_config(tmp_path, endpoint)), DiskCache(tmp_path / "cache", 1 << 30), **kw)


def _record_gets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(Range header, thread) of every GetObject request the pull sends to the server."""
    seen: list[tuple[str, int]] = []
    real = pull_s3.s3_client

    def record(request: Any, **_: Any) -> None:
        r = request.headers.get("Range") or ""
        seen.append((r.decode() if isinstance(r, bytes) else r, threading.get_ident()))

    def client(store: Any) -> Any:
        c = real(store)
        c.meta.events.register("before-send.s3.GetObject", record)
        return c

    monkeypatch.setattr(pull_s3, "s3_client", client)
    monkeypatch.setattr(pull_s3, "_clients", {})  # a client made before this test would not record
    return seen


def test_large_object_comes_as_concurrent_ranges(tmp_path: Path, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gets = _record_gets(monkeypatch)
    calls: list[tuple[int, int]] = []
    f = _fetcher(tmp_path, endpoint)
    digest = hashlib.sha256(BIG).hexdigest()
    p = asyncio.run(f.fetch({"path": "big/model.bin", "parameters": {"sha256": digest}}, on_progress=lambda d, t: calls.append((d, t))))
    assert p.read_bytes() == BIG
    ranges = sorted(r for r, _ in gets)
    assert len(ranges) == 13 and all(r.startswith("bytes=") for r in ranges), ranges
    assert len({t for _, t in gets}) > 1, "the ranges were fetched on more than one thread"
    # Progress: many calls (one per piece received), ending at the whole object.
    assert len(calls) >= 13 and calls[-1] == (len(BIG), len(BIG))
    assert max(d for d, _ in calls) == len(BIG)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_digest_of_a_ranged_pull_is_checked(tmp_path: Path, endpoint: str) -> None:
    f = _fetcher(tmp_path, endpoint)
    with pytest.raises(DigestError, match="sha256 is"):
        asyncio.run(f.fetch({"path": "big/model.bin", "parameters": {"sha256": "0" * 64}}))
    assert not list((tmp_path / "cache").iterdir()), "a corrupt download is neither published nor left behind"


def test_size_limit_stops_a_pull_midway(tmp_path: Path, endpoint: str) -> None:
    """The listing says 2 MiB, under the 2.5 MiB limit; while the first object comes down the
    second grows to 3 MiB, so only the bytes received can tell: the pull stops part-way."""
    c = _client(endpoint)
    c.put_object(Bucket="models", Key="grow/a.bin", Body=b"a" * (1 << 20))
    c.put_object(Bucket="models", Key="grow/b.bin", Body=b"b" * (1 << 20))
    grown = threading.Event()
    done: list[int] = []

    def on_progress(d: int, t: int) -> None:
        done.append(d)
        if not grown.is_set():
            grown.set()
            c.put_object(Bucket="models", Key="grow/b.bin", Body=b"B" * (3 << 20))

    limit = (5 << 20) // 2
    f = _fetcher(tmp_path, endpoint, max_model_bytes=limit)
    with pytest.raises(SizeLimitError, match="larger than the limit"):
        asyncio.run(f.fetch({"path": "grow"}, on_progress=on_progress))
    assert grown.is_set() and max(done) <= limit, "stopped at the limit, not after the whole object"
    assert not list((tmp_path / "cache").iterdir()), "nothing published, no staging left"


CHILD = """
import asyncio, json, sys
from pathlib import Path
from meshserve_loader import pull_s3
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.storage_config import load_storage_config
pull_s3.PART_BYTES, pull_s3.CONCURRENCY = 256 << 10, 4
tmp = Path(sys.argv[1])
def on_progress(done, total):
    if done > total // 2:
        print("half", flush=True)
        import time
        time.sleep(60)  # holds this range: the parent kills the process now
f = Fetcher(tmp / "pvc", load_storage_config(tmp / "storage-config.json"), DiskCache(tmp / "cache", 1 << 30))
asyncio.run(f.fetch({"path": "big/model.bin"}, on_progress=on_progress))
"""


def test_killed_mid_pull_leaves_only_staging_removed_on_restart(tmp_path: Path, endpoint: str) -> None:
    _config(tmp_path, endpoint)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the child's own sleep ends in 60 s
        assert line.strip() == "half", "the pull did not get half-way"
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    left = list((tmp_path / "cache").iterdir())
    assert [d.name[:5] for d in left] == [".tmp-"], left
    assert 0 < (left[0] / "model.bin").stat().st_size, "the partial file is inside the staging dir"
    time.sleep(1.1)  # the cache's grace for a pull between its mkdir and its flock
    DiskCache(tmp_path / "cache", 1 << 30).clean_staging()  # what a restarted loader does first
    assert not list((tmp_path / "cache").iterdir())
