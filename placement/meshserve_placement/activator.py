"""The activator: where Envoy sends requests for models that no pod holds yet.

It resolves the name, asks the placement leader for a load (many waiting requests make one
request), holds the request until a copy is loaded, then forwards it to that pod. Once the
route reaches the gateway, later requests skip this hop entirely. Unknown models get 404 and
models that cannot be loaded get 503, both as KServe v2 error JSON.

Traces (meshserve/tracing.py): a cold request is an `activator.request` span (continuing the
caller's traceparent when it sent one) with two children, `activator.hold` (the wait for the
load) and `activator.forward` (the first inference, on the pod that loaded it). The hold span's
context rides on the ms:loadreq entry, so the leader's decision and the pod's pull and load join
the same trace. Only the hold that writes the load request is their parent: other requests for
the same model held by this activator meanwhile link to that hold span instead (one load, many
waiters; a link keeps each request its own trace and still leads to the load).

Sent ahead of the load: once the leader has put the load on a pod whose runtime can hold a
request for it (Pod.awaits_loads, the built-in), the request goes there at once with
`ms-await-load`, and the runtime serves it the moment its load ends. The load's result then
need not come round through Redis to the activator, nor the request travel after it: both
overlap the load instead. Should the copy there fail or go before the pod answered, the forward
is dropped and the request waits as before (`_send_ahead`). The hold span then ends when the
request is sent (attribute `meshserve.sent_ahead`), and the forward span covers the load's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from meshserve import failures
from meshserve import tracing
from meshserve.httpbody import drain
from meshserve.model import CopyState, Pod, copies_from_json
from meshserve.settings import MAX_REQUEST_BYTES, Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_ALL, KIND_PAUSED, KIND_POD, LoadRequest, LoadResult
from meshserve.headers import AWAIT_LOAD_HEADER, MODEL_ID_HEADER, VMODEL_ID_HEADER
from meshserve_placement import openai_routes
from meshserve_placement import repository_api as repo
from meshserve_placement.coldpath import HOP_BY_HOP, M_COLD, M_COLD_WAIT, LoadFailed, log

# Forwarding to a copy that turns out gone (404 from the pod) sends the request back to wait.
FORWARD_ATTEMPTS = 3
FORWARD_SECONDS = 120.0  # a forward's own time (the session's timeout, __main__.py)
R = TypeVar("R")


@dataclass
class Ahead:
    """A forward sent while the copy on its pod still loads (the module's "Sent ahead"): the
    runtime holds it for up to `seconds`. The front's send sets `answered` once the pod's
    answer has begun; from then on the forward is not dropped (a stream may be under way). A
    send that ends with `answered` unset never reached the pod's runtime: the request waits."""

    seconds: float
    answered: bool = False

    def headers(self) -> dict[str, str]:
        return {AWAIT_LOAD_HEADER: f"{self.seconds:.3f}"}


# A front's forward of one request: to this pod, ahead of the load or not.
Send = Callable[[Pod, "Ahead | None"], Awaitable[tuple[int, R]]]


class Activator:
    def __init__(self, settings: Settings, state: State):
        self.s, self.state = settings, state
        # model -> the event the next change of its placement sets. A change replaces it (set
        # the old one, put a fresh one): a waiter takes the current one *before* it reads the
        # state, so a change that lands during that read still wakes it. (Clearing one shared
        # event per look let one waiter erase the wake-up another had not seen yet.)
        self._waiters: dict[str, asyncio.Event] = {}
        self._holding: dict[str, int] = {}  # model -> requests held for it; its entries go at 0
        # model -> the pod whose loader reported it loaded, for a model with requests held: they
        # go there at once instead of waiting for the leader's commit of the copy and its change
        # to come round (two hops of the cold path, issue 19 §4). Dropped with the hold.
        self._loaded_on: dict[str, str] = {}
        self._requested: dict[str, float] = {}
        self._requested_by: dict[str, trace.SpanContext] = {}  # model -> the hold span that asked for its load
        self.cold_requests = 0
        # Pods by id, read once: a cold request forwards as soon as its copy is loaded, without
        # another Redis round trip for the pod's address. Every write of a pod's record is a
        # commit with a `pod` change, and watch_changes drops the entry when it sees one.
        self._pods: dict[str, Pod] = {}
        # The pods placement marked paused (store keys.PAUSED), read when a model with several
        # loaded copies needs one and dropped on a `paused` change: None until then.
        self._paused: set[str] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def pod(self, pod_id: str) -> Pod | None:
        pod = self._pods.get(pod_id)
        if pod is None:
            pod = await self.state.pod(pod_id)
            if pod is not None:
                self._pods[pod_id] = pod
        return pod

    async def _answering(self, pods: list[str]) -> list[str]:
        """`pods` less those placement marked paused, unless that is all of them: a request
        forwarded to a paused pod waits for it to resume (the gateways skip them the same way)."""
        if len(pods) < 2:
            return pods
        if self._paused is None:
            self._paused = set(await ops.read_paused(self.state.r))
        return [p for p in pods if p not in self._paused] or pods

    def touch_soon(self, model_id: str) -> None:
        """Record the cold hit's recency without holding up the forward (one round trip off
        the cold path); placement marks a copy loaded for held requests busy by itself."""
        t = asyncio.create_task(self._touch(model_id))
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _touch(self, model_id: str) -> None:
        try:
            await self.state.touch([model_id])
        except Exception as e:  # noqa: BLE001 - recency is advisory
            log.warning("activator: recording the use of %s failed: %s", model_id, e)

    async def watch_changes(self) -> None:
        """Wake waiters when their model's placement changes."""
        last: bytes | str = "$"
        last_result: bytes | str = "$"
        while True:
            # Redis down: waiters time out with a reason meanwhile; the read is tried again with
            # exponential backoff and jitter, so a fleet of activators does not hammer it.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.2),
                before_sleep=self._changes_unread,
            ):
                with attempt:
                    entries, results = await ops.read_changes_and_results(self.state.r, last, last_result, count=1000, block=1000)
            for eid, ev in results:
                last_result = eid
                if isinstance(ev, LoadResult) and ev.ok and ev.model in self._holding:
                    self._loaded_on[ev.model] = ev.pod
                    self.wake(ev.model)
            for eid, ch in entries:
                last = eid
                if ch.kind == KIND_POD:
                    self._pods.pop(ch.id, None)
                elif ch.kind == KIND_PAUSED:
                    self._paused = None
                elif ch.kind == KIND_ALL:
                    self._pods.clear()
                    self._paused = None
                self.wake(ch.id)

    def _changes_unread(self, rs: RetryCallState) -> None:
        log.warning("activator: reading changes failed: %s", rs.outcome.exception() if rs.outcome else "")
        self._pods.clear()  # pod changes may be missed meanwhile
        self._paused = None

    def wake(self, model_id: str) -> None:
        """Every request held for `model_id` looks at its placement again."""
        ev = self._waiters.get(model_id)
        if ev is not None:
            self._waiters[model_id] = asyncio.Event()
            ev.set()

    async def ensure_loaded(self, model_id: str) -> Pod:
        """A pod with `model_id` loaded, once there is one (up to the cold-start timeout)."""
        return (await self._hold(model_id, ahead_ok=False))[0]

    async def _hold(self, model_id: str, ahead_ok: bool) -> tuple[Pod, bool]:
        """(a pod, whether its copy is still loading): a pod where the model is loaded, or with
        `ahead_ok` one that loads it and can hold a request for it (Pod.awaits_loads)."""
        with tracing.handling(model_id), tracing.tracer(__name__).start_as_current_span(
            "activator.hold", attributes={tracing.ATTR_MODEL: model_id}
        ) as span:
            self._holding[model_id] = self._holding.get(model_id, 0) + 1
            loading = False
            try:
                pod, loading = await self._wait_placed(model_id, span, ahead_ok)
            finally:
                # Sent ahead, the request stays held (its wake-ups, and the record of who asked
                # for the load, which later requests link to) until `_send_ahead` releases it.
                if not loading:
                    self._release(model_id)
            span.set_attribute(tracing.ATTR_POD, pod.id)
            if loading:
                span.set_attribute("meshserve.sent_ahead", True)
            return pod, loading

    def _release(self, model_id: str) -> None:
        """The per-model entries live while a request is held for the model, no longer: at a
        million models, keeping them would be a leak."""
        n = self._holding.get(model_id, 1) - 1
        if n > 0:
            self._holding[model_id] = n
            return
        for d in (self._holding, self._waiters, self._requested_by, self._loaded_on):
            d.pop(model_id, None)
        # The time of the last load request outlives the hold by its 2 s dedupe window only.
        cutoff = time.time() - 2.0
        if self._requested.get(model_id, 0.0) < cutoff:
            self._requested.pop(model_id, None)
        if len(self._requested) > 10_000:
            self._requested = {m: t for m, t in self._requested.items() if t >= cutoff}

    async def _wait_loaded(self, model_id: str, span: trace.Span) -> Pod:
        return (await self._wait_placed(model_id, span, ahead_ok=False))[0]

    async def _wait_placed(self, model_id: str, span: trace.Span, ahead_ok: bool) -> tuple[Pod, bool]:
        linked = False
        deadline = time.monotonic() + self.s.cold_start_timeout_seconds
        while True:
            ev = self._waiters.setdefault(model_id, asyncio.Event())
            on = self._loaded_on.get(model_id)
            if on is not None:
                pod = await self.pod(on)
                if pod is not None:
                    if self._holding.get(model_id, 0) <= 1:
                        self._requested.pop(model_id, None)  # as below: the load asked for is done
                    return pod, False
            asked = self._requested.get(model_id, 0.0)
            if not asked or time.time() - asked > self.s.cold_start_timeout_seconds:
                # Not asked for lately (the usual cold request): read the copies and ask for the
                # load in one round trip instead of two. Should a copy turn out to be loaded or
                # loading already, the leader ignores the request, or moves that load up its
                # queue. Failures before this ask are history either way.
                req = self._ask(model_id, span)
                async with self.state.r.pipeline(transaction=False) as p:
                    p.hget(k.PLACEMENTS, model_id)
                    ops.queue_request(p, req)
                    raw, _ = await p.execute()
                copies = copies_from_json(raw)
            else:
                copies = await self.state.copies(model_id)
            by = self._requested_by.get(model_id)
            if not linked and by is not None and by != span.get_span_context():
                span.add_link(by, {"meshserve.link": "load requested by"})  # waits on a load another request asked for
                linked = True
            loaded = [p for p, c in copies.items() if c.state == CopyState.LOADED]
            if loaded:
                pod = await self.pod(random.choice(await self._answering(loaded)))
                if pod is not None:
                    # The load asked for is done: once no other request is held for the model,
                    # the next one that finds no copy (evicted meanwhile: under churn, within a
                    # second) asks at once. Kept, the 2 s dedupe made it wait for the 1 s
                    # re-check and ask only then (a 1 s tail, issue 19 §3).
                    if self._holding.get(model_id, 0) <= 1:
                        self._requested.pop(model_id, None)
                    return pod, False
            loading = [p for p, c in copies.items() if c.state == CopyState.LOADING]
            if ahead_ok and loading:
                for pod_id in loading:
                    pod = await self.pod(pod_id)
                    if pod is not None and pod.awaits_loads:
                        return pod, True
            pending = bool(loading)
            asked = self._requested.get(model_id, 0.0)
            # Only failures after our own request count; older ones are history.
            # (pod, reason); pod "-" is placement's own failure (no pod can hold it).
            failed = [(p, c.reason) for p, c in copies.items() if c.state == CopyState.FAILED and asked and c.since >= asked]
            if not pending:
                if failed:
                    raise LoadFailed(503, _load_failure(model_id, *failed[-1]))
                if time.time() - asked > 2.0:
                    await ops.request_load(self.state.r, self._ask(model_id, span))
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                why = f"; last failure: {failures.describe(failed[-1][1], failed[-1][0] == '-')}" if failed else ""
                raise LoadFailed(503, f"model '{model_id}' was not loaded within {self.s.cold_start_timeout_seconds:g}s{why}")
            with contextlib.suppress(TimeoutError):  # not wait_for: it can swallow a client's cancel on 3.11
                async with asyncio.timeout(min(remaining, 1.0)):
                    await ev.wait()

    async def ask(self, model_id: str, op: str) -> None:
        """A request to the placement leader, the only writer of placements: `pin` or `unpin`."""
        await ops.request_load(self.state.r, LoadRequest(model_id, op))

    async def repository_index(self) -> list[dict[str, str]]:
        """Every registered name, in the v2 repository extension's form: READY with a loaded
        copy, LOADING while one loads, UNAVAILABLE otherwise (with the last failure's kind)."""
        async with self.state.r.pipeline(transaction=False) as p:
            p.hgetall(k.ALIASES).hgetall(k.PLACEMENTS)
            aliases, placements = await p.execute()
        out = []
        for alias, mid in sorted(aliases.items()):
            copies = copies_from_json(placements[mid]) if mid in placements else {}
            states = {c.state for c in copies.values()}
            entry = {"name": alias.decode(), "version": ""}
            if CopyState.LOADED in states:
                entry["state"] = "READY"
            elif CopyState.LOADING in states:
                entry["state"] = "LOADING"
            else:
                entry["state"] = "UNAVAILABLE"
                failed = [c.reason for c in copies.values() if c.state == CopyState.FAILED]
                entry["reason"] = failures.describe(failed[-1], False) if failed else "not loaded"
            out.append(entry)
        return out

    def _ask(self, model_id: str, span: trace.Span) -> LoadRequest:
        """Note that this activator asks for the model's load now; the ms:loadreq entry, which
        carries the hold span's context."""
        self._requested[model_id] = time.time()
        self._requested_by[model_id] = span.get_span_context()
        span.set_attribute("meshserve.load_requested", True)
        return LoadRequest(model_id, trace=dict(tracing.inject({})))

    async def serve_cold(self, model_id: str, protocol: str, t0: float, send: "Send[R]") -> R:
        """Hold the request until a copy is loaded, then `send` it to that pod, or send it
        ahead to the pod loading it (the module's "Sent ahead"). A 404 from the pod means the
        copy went between our look and the forward (evicted under churn), or the load it was
        sent ahead of did not bring it: a registered model never answers 404, so the request
        waits for a copy again, up to FORWARD_ATTEMPTS. Raises LoadFailed when no copy comes
        (counted per protocol)."""
        deadline = t0 + self.s.cold_start_timeout_seconds
        attempt = 0
        while True:
            try:
                # Sent ahead once at most: after that the request waits for a loaded copy.
                pod, loading = await self._hold(model_id, ahead_ok=attempt == 0)
            except LoadFailed as e:
                M_COLD.labels(protocol, str(e.status)).inc()
                raise
            first = attempt == 0
            if first:
                M_COLD.labels(protocol, "200").inc()
            attempt += 1
            self.touch_soon(model_id)
            if loading:
                got = await self._send_ahead(model_id, pod, send, max(deadline - time.monotonic(), 0.1))
                if got is None:  # its copy there failed or went before the pod answered
                    continue
                if first:  # the load ended on the pod, with the first inference after it
                    M_COLD_WAIT.observe(time.monotonic() - t0)
                status, out = got
            else:
                if first:
                    M_COLD_WAIT.observe(time.monotonic() - t0)
                status, out = await send(pod, None)
            if status != 404 or attempt >= FORWARD_ATTEMPTS:
                return out
            if self._loaded_on.get(model_id) == pod.id:
                del self._loaded_on[model_id]  # that load's copy is gone: wait for the placement
            log.info("%s was gone from %s when forwarded to; waiting for a copy again", model_id, pod.id)

    async def _send_ahead(self, model_id: str, pod: Pod, send: "Send[R]", seconds: float) -> tuple[int, R] | None:
        """`send` to `pod` while its copy still loads, watching the copy meanwhile: should it
        fail or go before the pod answered, the forward is dropped and None returned (the
        runtime, which never got that load, would hold the request to its end)."""
        ahead = Ahead(seconds)
        task = asyncio.create_task(send(pod, ahead))
        try:  # still held (`_hold` left it so): its wake-ups keep coming
            while True:
                ev = self._waiters.setdefault(model_id, asyncio.Event())
                woken = asyncio.create_task(ev.wait())
                try:
                    await asyncio.wait((task, woken), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if task.done() and not ahead.answered:
                    # The pod never answered: its connection broke (its runtime restarting, its
                    # loader killed mid-load and the pod's copies withdrawn). Wait for a copy.
                    log.info("%s: %s did not answer a request sent ahead of its load; waiting for a copy again", model_id, pod.id)
                    return None
                if task.done() or ahead.answered or self._loaded_on.get(model_id) == pod.id:
                    return await task  # answered, answering, or loaded there: its answer comes
                copy = (await self.state.copies(model_id)).get(pod.id)
                if copy is None or copy.state not in (CopyState.LOADING, CopyState.LOADED):
                    if ahead.answered:
                        return await task
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    log.info("%s's copy on %s %s while a request waited there; waiting for a copy again", model_id, pod.id,
                             "failed" if copy is not None and copy.state == CopyState.FAILED else "went")
                    return None
        finally:
            if not task.done():
                task.cancel()
            self._release(model_id)

    async def explicit_load(self, name: str) -> None:
        """The repository API's load, by InferenceService name: pins a copy, then returns once it
        is loaded (held like a cold request, for up to the cold-start timeout)."""
        model_id = await self.resolve(name)
        await self.ask(model_id, "pin")
        await self.ensure_loaded(model_id)

    async def explicit_unload(self, name: str) -> None:
        """Drops the pin of an explicit load; the copies then go as the cache needs the room."""
        await self.ask(await self.resolve(name), "unpin")

    async def resolve(self, name: str) -> str:
        model_id = await self.state.resolve(name)
        if model_id is None:
            raise LoadFailed(404, f"model '{name}' not found: no InferenceService or model is registered under this name")
        return model_id


def _load_failure(model_id: str, pod: str, reason: str) -> str:
    """The client's message for a failed load: model and kind only. The full reason (endpoints,
    buckets, key paths) goes to this log and stays on the copy for `meshserve explain`."""
    log.warning("load of %s failed on %s: %s", model_id, "placement" if pod == "-" else pod, reason)
    return failures.client_message(model_id, reason, placement=pod == "-")


# `GET /v2` and gRPC ServerMetadata at the gateway: the mesh, not one pod's runtime.
SERVER_METADATA = {"name": "meshserve", "version": "0.1.0", "extensions": ["model_repository", "binary_tensor_data"]}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def build_rest_app(act: Activator, session: aiohttp.ClientSession) -> web.Application:
    # The body is forwarded as it came, Content-Encoding and all: the runtime decodes it on an
    # inference thread, bounded. aiohttp's own decompression here would inflate a gzip bomb on
    # this event loop, stalling every held request, and a plain body labelled gzip was a 500.
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, handler_args={"auto_decompress": False})

    async def health_live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def health_ready(_: web.Request) -> web.Response:
        pods = await act.state.r.hlen(k.PODS)
        if pods == 0:
            return _error(503, "no runtime pods are registered yet")
        return web.json_response({"ready": True})

    async def server_md(_: web.Request) -> web.Response:
        return web.json_response(SERVER_METADATA)

    async def model_route(request: web.Request) -> web.Response:
        name = request.headers.get(MODEL_ID_HEADER) or request.match_info["name"]
        with tracing.tracer(__name__).start_as_current_span(
            "activator.request", context=tracing.extract(request.headers), kind=SpanKind.SERVER,
            attributes={"meshserve.protocol": "rest", "meshserve.name": name},
        ) as span:
            resp = await cold(request, name, span)
            span.set_attribute("http.response.status_code", resp.status)
            if resp.status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {resp.status}"))
            return resp

    async def cold(request: web.Request, name: str, span: trace.Span) -> web.Response:
        tail = request.match_info.get("tail", "")
        act.cold_requests += 1
        t0 = time.monotonic()
        try:
            model_id = await act.resolve(name)
            span.set_attribute(tracing.ATTR_MODEL, model_id)
        except LoadFailed as e:
            M_COLD.labels("rest", str(e.status)).inc()
            return _error(e.status, str(e))
        try:
            payload = await request.read()
        except web.HTTPRequestEntityTooLarge:
            await drain(request)
            return _error(413, f"request body is larger than the {MAX_REQUEST_BYTES >> 20} MiB limit")
        headers = {h: v for h, v in request.headers.items() if h.lower() not in HOP_BY_HOP}
        headers[MODEL_ID_HEADER] = model_id

        async def send(pod: Pod, ahead: Ahead | None = None) -> tuple[int, web.Response]:
            resp = await forward(request, pod, model_id, tail, payload, headers, ahead)
            return resp.status, resp

        try:
            return await act.serve_cold(model_id, "rest", t0, send)
        except LoadFailed as e:
            return _error(e.status, str(e))

    async def forward(request: web.Request, pod: Pod, model_id: str, tail: str, payload: bytes, headers: dict[str, str],
                      ahead: Ahead | None) -> web.Response:
        url = f"http://{pod.host}:{pod.rest_port}/v2/models/{model_id}{tail}"
        with tracing.handling(model_id), tracing.tracer(__name__).start_as_current_span(
            "activator.forward", kind=SpanKind.CLIENT, attributes={tracing.ATTR_MODEL: model_id, tracing.ATTR_POD: pod.id}
        ) as fspan:
            headers = {k: v for k, v in headers.items() if k.lower() not in (tracing.TRACEPARENT, tracing.TRACESTATE)}
            tracing.inject(headers)  # the pod continues this trace if it traces
            if ahead is not None:
                headers.update(ahead.headers())
            try:
                # Ahead of a load, the pod's answer also waits for the load: that wait is added.
                extra = {"timeout": aiohttp.ClientTimeout(total=FORWARD_SECONDS + ahead.seconds)} if ahead else {}
                async with session.request(request.method, url, data=payload, headers=headers, **extra) as r:
                    if ahead is not None:
                        ahead.answered = True
                    body = await r.read()
                    fspan.set_attribute("http.response.status_code", r.status)
                    # Binary tensor answers (Triton's extension) are split by this header.
                    passed = {k: v for k, v in r.headers.items() if k.lower() == "inference-header-content-length"}
                    return web.Response(status=r.status, body=body, content_type=r.content_type or "application/json", headers=passed)
            except aiohttp.ClientError as e:
                fspan.set_status(Status(StatusCode.ERROR, str(e)))
                # The error names the pod's address: the log gets it, the client does not.
                log.warning("forwarding %s to %s failed: %s", model_id, pod.id, e)
                return _error(503, f"model '{model_id}' is loaded but its runtime pod did not answer")

    async def repository_body(request: web.Request, check: Callable[[dict], object]) -> object:
        try:
            return check(repo.read_body(await request.read()))
        except web.HTTPRequestEntityTooLarge:
            raise LoadFailed(413, f"request body is larger than the {MAX_REQUEST_BYTES >> 20} MiB limit") from None
        except repo.RepositoryBodyError as e:
            raise LoadFailed(400, str(e)) from None

    async def repository_index(request: web.Request) -> web.Response:
        try:
            ready_only = await repository_body(request, repo.index_ready_only)
        except LoadFailed as e:
            return _error(e.status, str(e))
        index = await act.repository_index()
        return web.json_response([m for m in index if m["state"] == "READY"] if ready_only else index)

    async def repository_load(request: web.Request) -> web.Response:
        """Triton's explicit load, by InferenceService name: pins a copy, then answers once it
        is loaded (the load is held like a cold request, for up to the cold-start timeout)."""
        try:
            await repository_body(request, repo.check_load)
            await act.explicit_load(request.match_info["name"])
        except LoadFailed as e:
            return _error(e.status, str(e))
        return web.json_response({})

    async def repository_unload(request: web.Request) -> web.Response:
        """Drops the pin of an explicit load; the copies then go as the cache needs the room."""
        try:
            await repository_body(request, repo.check_unload)
            await act.explicit_unload(request.match_info["name"])
        except LoadFailed as e:
            return _error(e.status, str(e))
        return web.json_response({})

    async def not_found(request: web.Request) -> web.Response:
        return _error(404, f"no such endpoint: {request.method} {request.path}; see the KServe v2 protocol (/v2/models/<name>/infer)")

    app.router.add_get("/v2/health/live", health_live)
    app.router.add_get("/v2/health/ready", health_ready)
    app.router.add_get("/v2", server_md)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{name}/load", repository_load)
    app.router.add_post("/v2/repository/models/{name}/unload", repository_unload)
    app.router.add_route("*", r"/v2/models/{name:[^/]+}{tail:(/.*)?}", model_route)
    openai_routes.add_routes(app, act, session)  # /v1: OpenAI-compatible endpoints (issue 17)
    app.router.add_route("*", "/{path:.*}", not_found)
    return app
