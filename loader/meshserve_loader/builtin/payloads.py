"""ModelMesh's payload processors (`MM_PAYLOAD_PROCESSORS`), in the built-in runtime.

ModelMesh hands every inference's request and response to the processors its pods are given
(kserve/modelmesh `ModelMesh.initPayloadProcessor`, `payload/RemotePayloadProcessor.java`):
TrustyAI's operator sets one (`http://trustyai-service.<ns>/consumer/kserve/v2`) to collect
what models see and answer for drift and fairness monitoring. The same definitions work here:

- a whitespace-separated list of URIs; the scheme picks the processor (`http`, and `https`
  here too: an HTTP POST of each payload; `logger`: a log line), the query names the one model
  id to watch and the fragment the one method (empty or `*`: all);
- each payload is POSTed as the JSON ModelMesh sends: `id`, `modelid`, `vModelId` (null, as
  ModelMesh's processing leaves it), `kind` (`request` / `response`), `data` (the KServe v2 gRPC
  message, base64: ModelMesh sees REST as gRPC too, through its REST proxy), `status` (the gRPC
  status code name on responses, "" on requests) and `metadata` (the request's headers).

What differs, by decision: credentials (`authorization`, `cookie`, `proxy-authorization`)
are not copied into the metadata; a REST request that is not a valid inference request gets
no payloads (ModelMesh's REST proxy refuses it before ModelMesh sees it).

Nothing here is on the request's path: `record` only queues (bounded, `capacity` entries as
ModelMesh's MM_PAYLOAD_PROCESSORS_CAPACITY; full: the payload is dropped and counted), the
encoding runs on a thread of its own and the posts on the event loop, `workers` at a time."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("meshserve.runtime.payloads")

# The gRPC method both transports' inference is, as ModelMesh names it to its processors.
INFER_METHOD = "inference.GRPCInferenceService/ModelInfer"
# ModelMesh's defaults (MM_PAYLOAD_PROCESSORS_CAPACITY, MM_PAYLOAD_PROCESSORS_THREADS).
DEFAULT_CAPACITY = 64
DEFAULT_WORKERS = 2
POST_TIMEOUT_SECONDS = 10.0
_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# REST answers as the gRPC status a client of ModelMesh's REST proxy would have met.
_HTTP_TO_GRPC = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
                 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class Processor:
    """One definition: where payloads go (`url`; "" for the log) and which it takes."""

    kind: str  # "remote" or "logger"
    url: str = ""
    model: str | None = None  # None: every model
    method: str | None = None  # None: every method

    def takes(self, model_id: str, method: str) -> bool:
        return (self.model is None or self.model == model_id) and (self.method is None or self.method == method)


def _any_if_blank(v: str) -> str | None:
    v = v.removeprefix("/")
    return None if v in ("", "*") else v


def parse(definitions: str) -> list[Processor]:
    """MM_PAYLOAD_PROCESSORS as ModelMesh reads it. A definition that is not a URI, or names a
    scheme no processor has, is skipped with a warning that says why (ModelMesh logs the first
    and ignores the second)."""
    out: list[Processor] = []
    for d in definitions.split():
        try:
            u = urlsplit(d)
        except ValueError as e:
            log.warning("payload processor %r is not a URI (%s): skipped", d, e)
            continue
        model, method = _any_if_blank(u.query), _any_if_blank(u.fragment)
        if u.scheme in ("http", "https"):
            if not u.hostname:
                log.warning("payload processor %r names no host: skipped", d)
                continue
            # The fragment only filters; an HTTP client never sends it.
            out.append(Processor("remote", urlunsplit((u.scheme, u.netloc, u.path, u.query, "")), model, method))
        elif u.scheme == "logger":
            out.append(Processor("logger", "", model, method))
        else:
            log.warning("payload processor %r: no processor for scheme %r (http, https or logger): skipped", d, u.scheme)
    return out


def status_of_http(code: int) -> str:
    return _HTTP_TO_GRPC.get(code, "UNKNOWN" if code >= 500 else "INVALID_ARGUMENT")


def plain_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request headers as ModelMesh's metadata map, without credentials; binary (`-bin`)
    gRPC metadata is base64, as ModelMesh sends it."""
    out: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        if k in _SECRET_HEADERS:
            continue
        out[k] = base64.b64encode(v).decode() if isinstance(v, bytes) else str(v)
    return out


@dataclass
class _Exchange:
    model_id: str
    method: str
    request: Callable[[], bytes] | bytes | None
    response: Callable[[], bytes] | bytes | None
    status: str
    metadata: Mapping[str, str]


def _bytes(v: Callable[[], bytes] | bytes | None) -> bytes:
    if v is None:
        return b""
    return v() if callable(v) else v


class PayloadSink:
    """Queues each inference's request and response for the processors and sends them."""

    def __init__(self, processors: list[Processor], registry: CollectorRegistry | None = None,
                 capacity: int = DEFAULT_CAPACITY, workers: int = DEFAULT_WORKERS) -> None:
        self.processors = processors
        self.capacity, self.workers = max(1, capacity), max(1, workers)
        self._queue: asyncio.Queue[_Exchange] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="payloads")
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-"
        self.m_payloads = Counter("meshserve_runtime_payloads", "Inference payloads handed to payload processors (MM_PAYLOAD_PROCESSORS), by outcome",
                                  ["outcome"], registry=registry)

    def start(self) -> None:
        self._queue = asyncio.Queue(self.capacity)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_SECONDS))
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        log.info("payload processors: %s", ", ".join(p.url or "logger" for p in self.processors))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def wants(self, model_id: str, method: str = INFER_METHOD) -> bool:
        return any(p.takes(model_id, method) for p in self.processors)

    def record(self, model_id: str, request: Callable[[], bytes] | bytes | None, response: Callable[[], bytes] | bytes | None,
               status: str, headers: Iterable[tuple[str, Any]], method: str = INFER_METHOD) -> None:
        """Queue one inference's two payloads; never waits. `request` and `response` are the
        gRPC messages' bytes, or functions that make them (called on the payload thread);
        `headers` the request's, read only when a processor takes this model."""
        if self._queue is None or not self.wants(model_id, method):
            return
        try:
            self._queue.put_nowait(_Exchange(model_id, method, request, response, status, plain_headers(headers)))
        except asyncio.QueueFull:
            self.m_payloads.labels("dropped").inc(2)

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            ex = await self._queue.get()
            try:
                bodies = await loop.run_in_executor(self._encoder, self._encode, ex)
                for p in self.processors:
                    if p.takes(ex.model_id, ex.method):
                        for body in bodies:
                            await self._send(p, body)
            except Exception:  # noqa: BLE001 - one bad payload must not stop the worker
                log.exception("payloads of a %s call to %s could not be processed", ex.method, ex.model_id)
                self.m_payloads.labels("failed").inc(2)

    def _encode(self, ex: _Exchange) -> list[dict[str, Any]]:
        pid = self._prefix + str(next(self._ids))
        common = {"id": pid, "modelid": ex.model_id, "vModelId": None, "metadata": dict(ex.metadata)}
        return [
            {**common, "kind": "request", "data": base64.b64encode(_bytes(ex.request)).decode(), "status": ""},
            {**common, "kind": "response", "data": base64.b64encode(_bytes(ex.response)).decode(), "status": ex.status},
        ]

    async def _send(self, p: Processor, body: dict[str, Any]) -> None:
        if p.kind == "logger":
            log.info("payload %s %s of %s: %d bytes of data, status %r", body["id"], body["kind"], body["modelid"],
                     len(body["data"]) * 3 // 4, body["status"])
            self.m_payloads.labels("sent").inc()
            return
        assert self._session is not None
        t0 = time.monotonic()
        try:
            async with self._session.post(p.url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    log.warning("payload processor %s answered %d to payload %s (%s)", p.url, r.status, body["id"], body["kind"])
                    self.m_payloads.labels("failed").inc()
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("payload processor %s unreachable after %.1f s: %s", p.url, time.monotonic() - t0, e)
            self.m_payloads.labels("failed").inc()
            return
        self.m_payloads.labels("sent").inc()


def from_env(env: Mapping[str, str], configured: str, registry: CollectorRegistry | None = None) -> PayloadSink | None:
    """The sink for `configured` (MESHSERVE_PAYLOAD_PROCESSORS), else ModelMesh's own variables,
    so a pod spec written for ModelMesh works as it is; None when nothing is configured."""
    definitions = configured or env.get("MM_PAYLOAD_PROCESSORS", "")
    processors = parse(definitions)
    if not processors:
        return None

    def number(var: str, default: int) -> int:
        raw = env.get(var, "").strip()
        if not raw:
            return default
        if not raw.isdigit() or int(raw) < 1:
            raise SystemExit(f"{var}={raw!r}: expected a positive whole number (the payload processors' queue size and senders)")
        return int(raw)

    return PayloadSink(processors, registry, capacity=number("MM_PAYLOAD_PROCESSORS_CAPACITY", DEFAULT_CAPACITY),
                       workers=number("MM_PAYLOAD_PROCESSORS_THREADS", DEFAULT_WORKERS))
