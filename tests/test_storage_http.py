"""Kind: real server. Pulls over HTTP from a real aiohttp server on 127.0.0.1 (in the test's own
event loop, stopped at the end): atomic writes, digest, size limit, cache, errors; and from
meshserve_testing.model_store.ModelStore (a threaded HTTP server on 127.0.0.1): resuming with Range after a cut,
restarting when Range is ignored, a loader killed mid-pull."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from meshserve_testing.devmesh import free_port
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
from meshserve_loader.sink import DigestError
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import parse_secret

BODY = b"onnx-ish-bytes" * 5000


async def _serve(hits: list[str]) -> tuple[web.AppRunner, str]:
    async def model(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.headers.get("Authorization") != "Bearer t0k" and request.path.startswith("/private"):
            return web.Response(status=403)
        return web.Response(body=BODY)

    async def cut(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers={"Content-Length": str(len(BODY))})
        await r.prepare(request)
        await r.write(BODY[:1000])
        request.transport.close()  # the connection drops mid-download
        return r

    app = web.Application()
    app.router.add_get("/models/m.onnx", model)
    app.router.add_get("/private/{name}", model)
    app.router.add_get("/cut/m.onnx", cut)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _fetcher(tmp_path: Path, stores: dict | None = None, **kw: int) -> Fetcher:
    return Fetcher(tmp_path / "pvc", stores or {}, DiskCache(tmp_path / "cache", 1 << 30), progress_min_bytes=10_000, **kw)


async def test_http_uri_pull_digest_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hits: list[str] = []
    runner, base = await _serve(hits)
    try:
        f = _fetcher(tmp_path)
        digest = hashlib.sha256(BODY).hexdigest()
        with caplog.at_level("INFO", logger="meshserve.loader.pull"):
            p = await f.fetch({"uri": f"{base}/models/m.onnx?sig=secret", "parameters": {"sha256": digest}})
        assert p.name == "m.onnx" and p.read_bytes() == BODY
        assert "100%" in caplog.text and "sig=secret" not in caplog.text  # progress, and no token in logs
        assert await f.fetch({"uri": f"{base}/models/m.onnx?sig=secret", "parameters": {"sha256": digest}}) == p
        assert len(hits) == 1, "the reload came from the disk cache"
        with pytest.raises(DigestError):
            await f.fetch({"uri": f"{base}/models/m.onnx", "parameters": {"sha256": "ab" * 32}})
    finally:
        await runner.cleanup()


async def test_http_store_with_headers_and_errors(tmp_path: Path) -> None:
    hits: list[str] = []
    runner, base = await _serve(hits)
    try:
        stores = parse_secret({"web": json.dumps({"type": "http", "url": base + "/private", "headers": {"Authorization": "Bearer t0k"}}),
                               "noauth": json.dumps({"type": "http", "url": base + "/private"})})
        f = _fetcher(tmp_path, stores)
        assert (await f.fetch({"key": "web", "path": "m.onnx"})).read_bytes() == BODY
        with pytest.raises(StorageError, match="HTTP 403"):
            await f.fetch({"key": "noauth", "path": "other.onnx"})
        with pytest.raises(StorageError, match="HTTP 404"):
            await f.fetch({"uri": base + "/nothing.onnx"})
        with pytest.raises(StorageError, match="over the limit"):
            await _fetcher(tmp_path / "small", max_model_bytes=1000).fetch({"uri": base + "/models/m.onnx"})
        with pytest.raises(StorageError):
            await f.fetch({"uri": base + "/cut/m.onnx"})
        closed = free_port()
        with pytest.raises(StorageError, match="ClientConnectorError|Cannot connect"):
            await f.fetch({"uri": f"http://127.0.0.1:{closed}/m.onnx"})
        assert not list((tmp_path / "cache").glob(".tmp-*")), "failed pulls leave no temporaries"
    finally:
        await runner.cleanup()


# --- Resuming a dropped download: meshserve_testing.model_store.ModelStore, a real threaded HTTP server on 127.0.0.1
# that drops the connection half-way (`cut`) and honours or ignores Range (`ranges`).

from meshserve_testing.model_store import ModelStore  # noqa: E402
from meshserve_loader import pull_http  # noqa: E402

MODEL = os.urandom(4 << 20)


async def _pull(tmp_path: Path, store: ModelStore, calls: list[tuple[int, int]] | None = None, **kw: str) -> Path:
    f = _fetcher(tmp_path)
    return await f.fetch({"uri": f"{store.url}/m.onnx", **kw}, on_progress=(lambda d, t: calls.append((d, t))) if calls is not None else None)


async def test_cut_download_resumes_with_range(tmp_path: Path) -> None:
    """Two drops: each retry asks for the rest only, and the file is the server's bytes."""
    calls: list[tuple[int, int]] = []
    with ModelStore({"m.onnx": MODEL}) as store:
        store.cut = 2
        p = await _pull(tmp_path, store, calls, parameters={"sha256": hashlib.sha256(MODEL).hexdigest()})
        assert p.read_bytes() == MODEL
        half, quarter = len(MODEL) // 2, len(MODEL) // 4
        assert store.range_headers == [None, f"bytes={half}-", f"bytes={half + quarter}-"]
        assert store.sent == len(MODEL), "nothing was sent twice"
    assert calls[-1] == (len(MODEL), len(MODEL)) and all(d <= len(MODEL) for d, _ in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls), "progress only goes forward when resuming"


async def test_server_ignoring_range_restarts_cleanly(tmp_path: Path) -> None:
    """A plain server answers the resume with a 200 of the whole file: the download starts over
    (no splice of the whole file onto the half already written)."""
    calls: list[tuple[int, int]] = []
    with ModelStore({"m.onnx": MODEL}, ranges=False) as store:
        store.cut = 1
        p = await _pull(tmp_path, store, calls, parameters={"sha256": hashlib.sha256(MODEL).hexdigest()})
        assert p.read_bytes() == MODEL
        assert store.range_headers == [None, f"bytes={len(MODEL) // 2}-"] and store.sent == len(MODEL) * 3 // 2
    assert calls[-1] == (len(MODEL), len(MODEL)) and max(d for d, _ in calls) == len(MODEL)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


async def test_file_replaced_between_attempts_is_not_spliced(tmp_path: Path) -> None:
    """If-Range: the file changed after the cut, so the server sends the new one whole."""
    new = os.urandom(3 << 20)
    with ModelStore({"m.onnx": MODEL}) as store:
        store.cut = 1

        def swap(d: int, t: int) -> None:
            store.files["m.onnx"] = new

        p = await _fetcher(tmp_path).fetch({"uri": f"{store.url}/m.onnx"}, on_progress=swap)
        assert p.read_bytes() == new
        assert store.range_headers[1] == f"bytes={len(MODEL) // 2}-"


async def test_gives_up_after_the_attempts_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_http, "ATTEMPTS", 3)
    with ModelStore({"m.onnx": MODEL}) as store:
        store.cut = 100
        with pytest.raises(StorageError, match=r"gave up after 3 attempts .*got \d+ of 4194304 bytes.*load the model again"):
            await _pull(tmp_path, store)
        assert store.gets == 3
    assert not list((tmp_path / "cache").glob(".tmp-*")), "the partial file is not kept"


HTTP_CHILD = """
import asyncio, sys
from pathlib import Path
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.fetch import Fetcher
tmp, url = Path(sys.argv[1]), sys.argv[2]
asyncio.run(Fetcher(tmp / "pvc", {}, DiskCache(tmp / "cache", 1 << 30)).fetch({"uri": url}))
"""


def test_killed_mid_pull_leaves_only_staging_removed_on_restart(tmp_path: Path) -> None:
    """A loader SIGKILLed while the store holds its download half-way: only the staging dir
    with the partial file is left, nothing is published, and a restarted loader's cache
    removes it (its flock died with the process)."""
    with ModelStore({"m.onnx": MODEL}) as store:
        store.hold.set()
        proc = subprocess.Popen([sys.executable, "-c", HTTP_CHILD, str(tmp_path), f"{store.url}/m.onnx"])
        try:
            assert store.held.wait(60), "the download never got half-way"
            staged = list((tmp_path / "cache").glob(".tmp-*/m.onnx"))
            deadline = time.monotonic() + 10  # bounded: the half is on its way to disk
            while (not staged or staged[0].stat().st_size < len(MODEL) // 2) and time.monotonic() < deadline:
                time.sleep(0.05)
                staged = list((tmp_path / "cache").glob(".tmp-*/m.onnx"))
            proc.kill()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    left = list((tmp_path / "cache").iterdir())
    assert [d.name[:5] for d in left] == [".tmp-"], left
    assert (left[0] / "m.onnx").stat().st_size == len(MODEL) // 2
    time.sleep(1.1)  # the cache's grace for a pull between its mkdir and its flock
    DiskCache(tmp_path / "cache", 1 << 30).clean_staging()
    assert not list((tmp_path / "cache").iterdir())
