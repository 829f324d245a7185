"""Kind: real server. Pulls over HTTP from a real aiohttp server on 127.0.0.1 (in the test's own
event loop, stopped at the end): atomic writes, digest, size limit, cache, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from aiohttp import web

from meshserve.devmesh import free_port
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
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


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
