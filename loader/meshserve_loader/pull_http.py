"""Pulling a single-file model over HTTP(S) with aiohttp.

A dropped connection (or a stalled one, past the timeout) does not throw the download away:
it is retried (tenacity, with backoff, ATTEMPTS in all) from where it stopped, with
`Range: bytes=<done>-` and `If-Range` (the first response's ETag or Last-Modified, so a file
replaced in between is sent whole instead of spliced onto the old one). The answer must be a
206 whose Content-Range starts at <done> and has the same total; a 200 (a server that ignores
Range, or a changed file) restarts the file from zero. Either way the bytes written are the
file's bytes in order, so the size limit and the sha256 apply to them as they stream.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from meshserve_loader.sink import Budget, Progress, Sink
from meshserve_loader.storage import StorageError

log = logging.getLogger("meshserve.loader.pull")

CHUNK = 1 << 20
ATTEMPTS = 5  # GETs in all, the first included
WAIT_MAX = 4.0  # seconds between attempts at most (0.25, 0.5, 1, 2, 4...)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def file_name_of(url: str) -> str:
    """The URL's last path segment, made safe as a file name (it keeps its suffix, which tells
    the runtime the format, e.g. .joblib or .onnx)."""
    name = posixpath.basename(urlsplit(url).path) or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return "model" if name in (".", "..") else name


class _Dropped(Exception):
    """The connection went away (or stalled) mid-download: worth another attempt."""


@dataclass
class _Download:
    """What survives between attempts: the file so far and what identifies the server's copy."""

    path: Path
    shown: str
    max_bytes: int
    progress: Progress
    sink: Sink | None = None
    total: int = 0  # the file's length, when the server said
    validator: str = ""  # ETag or Last-Modified of the first response, for If-Range
    restarts: int = 0  # 200s to a ranged request: the file began again
    dropped: int = 0

    @property
    def done(self) -> int:
        return self.sink.budget.used if self.sink else 0

    def start_over(self) -> None:
        """Truncate to zero: a new sink (budget, hash), and progress taken back."""
        if self.sink is not None:
            self.sink.close()
            self.progress.add(-self.done)
        self.sink = Sink(self.path, self.shown, Budget(self.max_bytes), self.progress)


async def pull_http(
    url: str, dest: Path, headers: dict[str, str], max_bytes: int, progress_min_bytes: int, sha256: str = "", timeout: float = 600.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Download `url` into the empty dir `dest`; returns the file's name inside it. `timeout`
    bounds each GET; a cut or timed-out GET is resumed (module docstring)."""
    name = file_name_of(url)
    shown = urlsplit(url)._replace(query="", fragment="").geturl()  # a query can carry a token
    dl = _Download(dest / name, shown, max_bytes, Progress(shown, 0, progress_min_bytes, on_progress))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=10)) as s:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(_Dropped), stop=stop_after_attempt(ATTEMPTS),
                wait=wait_exponential(multiplier=0.25, max=WAIT_MAX), reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await _get(s, url, headers, dl)
    except _Dropped as e:
        got = f"; got {dl.done} of {dl.total or '?'} bytes" if dl.done else ""
        raise StorageError(f"{shown}: gave up after {ATTEMPTS} attempts (last: {e}){got}. "
                           "Check that the server is up and reachable, then load the model again") from None
    except aiohttp.ClientError as e:
        raise StorageError(f"{shown}: {type(e).__name__}: {e}") from None
    finally:
        if dl.sink is not None:
            dl.sink.close()
    assert dl.sink is not None
    dl.sink.verify(sha256)
    if dl.restarts:
        log.info("pulled %s: the server ignored Range, so %d interrupted download(s) started over", shown, dl.restarts)
    return name


async def _get(s: aiohttp.ClientSession, url: str, headers: dict[str, str], dl: _Download) -> None:
    """One GET: the whole file, or the rest of it when some is already on disk."""
    # The bytes as stored: a compressed transfer can't be resumed at a byte offset of the file.
    h = {"Accept-Encoding": "identity", **headers}
    resuming = dl.sink is not None and dl.done > 0
    if resuming:
        h["Range"] = f"bytes={dl.done}-"
        if dl.validator:
            h["If-Range"] = dl.validator
    try:
        async with s.get(url, headers=h) as r:
            if r.status >= 500 or r.status == 429:
                raise _Dropped(f"HTTP {r.status} {r.reason}")  # the server's trouble, maybe passing
            if r.status == 206 and resuming:
                m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
                if not m or int(m[1]) != dl.done or (m[3] != "*" and dl.total and int(m[3]) != dl.total):
                    # Not the rest of the same file: start over rather than splice.
                    raise StorageError(f"{dl.shown}: the server answered a resume from byte {dl.done} with "
                                       f"Content-Range {r.headers.get('Content-Range')!r}; load the model again")
                dl.total = dl.total or (int(m[3]) if m[3] != "*" else 0)
                log.info("resuming %s at byte %d of %d", dl.shown, dl.done, dl.total)
            elif r.status == 200:
                if resuming:
                    dl.restarts += 1
                    log.info("%s: the server sent the whole file again (no Range support, or it changed): starting over", dl.shown)
                dl.start_over()
                dl.total = r.content_length or 0
                dl.validator = _strong_etag(r.headers.get("ETag", "")) or r.headers.get("Last-Modified", "")
                if dl.total > dl.max_bytes:
                    raise StorageError(f"{dl.shown}: model is {dl.total} bytes, over the limit of {dl.max_bytes} (MESHSERVE_MAX_MODEL_BYTES)")
                dl.progress.total = dl.total
            else:
                raise StorageError(f"{dl.shown}: HTTP {r.status} {r.reason}")
            assert dl.sink is not None
            async for chunk in r.content.iter_chunked(CHUNK):
                dl.sink.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, asyncio.TimeoutError) as e:
        dl.dropped += 1
        raise _Dropped(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    if dl.total and dl.done != dl.total:
        dl.dropped += 1
        raise _Dropped(f"got {dl.done} of {dl.total} bytes")


def _strong_etag(etag: str) -> str:
    """If-Range takes only a strong ETag (RFC 9110 13.1.5): a weak one (W/"...") is not used."""
    return "" if etag.startswith("W/") else etag
