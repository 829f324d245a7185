"""Pulling a single-file model over HTTP(S) with aiohttp."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import aiohttp

from meshserve_loader.sink import Budget, Progress, Sink
from meshserve_loader.storage import StorageError

CHUNK = 1 << 20


def file_name_of(url: str) -> str:
    """The URL's last path segment, made safe as a file name (it keeps its suffix, which tells
    the runtime the format, e.g. .joblib or .onnx)."""
    name = posixpath.basename(urlsplit(url).path) or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return "model" if name in (".", "..") else name


async def pull_http(
    url: str, dest: Path, headers: dict[str, str], max_bytes: int, progress_min_bytes: int, sha256: str = "", timeout: float = 600.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Download `url` into the empty dir `dest`; returns the file's name inside it."""
    name = file_name_of(url)
    shown = urlsplit(url)._replace(query="", fragment="").geturl()  # a query can carry a token
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10)) as s:
            async with s.get(url, headers=headers) as r:
                if r.status != 200:
                    raise StorageError(f"{shown}: HTTP {r.status} {r.reason}")
                total = r.content_length or 0
                if total > max_bytes:
                    raise StorageError(f"{shown}: model is {total} bytes, over the limit of {max_bytes} (MESHSERVE_MAX_MODEL_BYTES)")
                sink = Sink(dest / name, shown, Budget(max_bytes), Progress(shown, total, progress_min_bytes, on_progress))
                try:
                    async for chunk in r.content.iter_chunked(CHUNK):
                        sink.write(chunk)
                finally:
                    sink.close()
                sink.verify(sha256)
                if total and sink.progress.done != total:
                    raise StorageError(f"{shown}: got {sink.progress.done} of {total} bytes (connection cut)")
    except aiohttp.ClientError as e:
        raise StorageError(f"{shown}: {type(e).__name__}: {e}") from None
    return name
