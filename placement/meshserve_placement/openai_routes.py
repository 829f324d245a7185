"""The activator's OpenAI-compatible endpoints (issue 17, item 4).

The gateway sends a /v1/ request here when its body's `model` is cold (or names nothing it
knows a scope for that is loaded), and GET /v1/models always:
- POST /v1/embeddings, /v1/completions, /v1/chat/completions: resolve `model`, hold the request
  while the model loads, as for v2 requests, then forward it to the pod that has it (with
  `mm-model-id`). A streamed answer (`stream: true`, server-sent events) is relayed as the
  pod sends it, unbuffered. Once the route is at the gateway later requests skip this hop.
- GET /v1/models, GET /v1/models/{model}: what the mesh serves, from the registry (every
  registered name users address: InferenceService names), each with its base when it is an
  adapter (`parent`).

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, which its clients
raise as NotFoundError (404), BadRequestError (400) and so on.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from meshserve.model import ModelSpec, Pod
from meshserve.store import keys as k
from meshserve.headers import MODEL_ID_HEADER
from meshserve.openai_protocol import OpenAIError, body_model, error_body, parse_body
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_placement.coldpath import HOP_BY_HOP, M_COLD, LoadFailed, log

ENDPOINTS = ("embeddings", "completions", "chat/completions")
EVENT_STREAM = "text/event-stream"
# A stream lasts as long as the model generates: no total bound, only one between bytes, and the
# connect (the session's own 120 s total would cut a long generation).
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status)


def _model_not_found(name: str) -> web.Response:
    return error(404, f"The model '{name}' does not exist: no InferenceService or model is registered under this name",
                 param="model", code="model_not_found")


def _listing(models: dict[bytes, bytes], aliases: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """One entry per name users address (aliases), sorted; `parent` is an adapter's base."""
    out = []
    for alias, mid in sorted(aliases.items()):
        raw = models.get(mid)
        if raw is None:
            continue
        spec = ModelSpec.from_json(raw)
        out.append({"id": alias.decode(), "object": "model", "created": 0, "owned_by": spec.namespace,
                    "parent": spec.base or None, "meshserve_id": spec.id})
    return out


def _openai_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)


async def relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """A streamed answer (server-sent events) passed on chunk by chunk as the pod sends it, not
    read whole first: the client sees the first token of a cold request as soon as the pod
    has it. If the pod's stream breaks, the client's ends the same way (no [DONE])."""
    resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        async for data in upstream.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
    except ConnectionResetError:  # the client left (it may close as soon as it read [DONE])
        pass
    except aiohttp.ClientError as e:
        log.warning("stream from the pod broke: %s", e)
        if request.transport is not None:  # cut the client's too, rather than end it cleanly
            request.transport.close()
    return resp


def add_routes(app: web.Application, act: Any, session: aiohttp.ClientSession) -> None:
    """Register the /v1 routes on the activator's REST app (`act`: activator.Activator)."""

    async def models(request: web.Request) -> web.Response:
        async with act.state.r.pipeline(transaction=False) as p:
            p.hgetall(k.MODELS).hgetall(k.ALIASES)
            raw_models, raw_aliases = await p.execute()
        data = await asyncio.to_thread(_listing, raw_models, raw_aliases)
        one = request.match_info.get("model")
        if one is None:
            return web.json_response({"object": "list", "data": data})
        for m in data:
            if m["id"] == one:
                return web.json_response(m)
        return _model_not_found(one)

    async def cold(request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        try:
            payload = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"request body is larger than the {MAX_REQUEST_BYTES >> 20} MiB limit")
        try:
            body = parse_body(payload)
            name = body_model(body)
        except OpenAIError as e:
            return web.json_response(e.body(), status=e.status)
        act.cold_requests += 1
        t0 = time.monotonic()
        try:
            # A traffic split's branch whose model has no copy comes here with that model in
            # `mm-model-id` (traffic.py): it is served, not the name's default.
            model_id = await act.resolve(request.headers.get(MODEL_ID_HEADER) or name)
        except LoadFailed:
            M_COLD.labels("openai", "404").inc()
            return _model_not_found(name)
        headers = {h: v for h, v in request.headers.items() if h.lower() not in HOP_BY_HOP}
        headers[MODEL_ID_HEADER] = model_id

        async def send(pod: Pod, ahead: Any = None) -> tuple[int, web.StreamResponse]:
            """`ahead`: activator.Ahead when sent ahead of the model's load there."""
            url = f"http://{pod.host}:{pod.rest_port}/v1/{endpoint}"
            try:
                # Ahead of a load, the pod's first byte also waits for the load: that wait is added.
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120 + ahead.seconds) if ahead else STREAM_TIMEOUT
                async with session.post(url, data=payload, headers={**headers, **ahead.headers()} if ahead else headers,
                                        timeout=timeout) as r:
                    if ahead is not None:
                        ahead.answered = True
                    if r.status == 200 and r.content_type == EVENT_STREAM:
                        return r.status, await relay(request, r)
                    out = await r.read()
                    if r.status == 404 and not _openai_error(out):
                        # Not the runtime saying the model is gone (that is OpenAI's error JSON,
                        # and the copy is waited for again): a runtime with no /v1 endpoints,
                        # such as MLServer. Said plainly, and not retried.
                        return 400, error(400, f"The model '{name}' is served by a runtime that has no {request.path} endpoint "
                                               "(the built-in runtime has; MLServer has not)", param="model", code="unsupported_endpoint")
                    return r.status, web.Response(status=r.status, body=out, content_type=r.content_type or "application/json")
            except aiohttp.ClientError as e:
                log.warning("forwarding %s to %s failed: %s", model_id, pod.id, e)
                return 503, error(503, f"model '{name}' is loaded but its runtime pod did not answer", "server_error")

        try:
            return await act.serve_cold(model_id, "openai", t0, send)
        except LoadFailed as e:
            return error(e.status, str(e), "server_error" if e.status >= 500 else "invalid_request_error",
                         code="model_not_loaded" if e.status >= 500 else None)

    async def other(request: web.Request) -> web.Response:
        return error(404, f"Invalid URL ({request.method} {request.path}): this mesh serves POST /v1/embeddings, "
                          "/v1/completions, /v1/chat/completions and GET /v1/models", code="unknown_url")

    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", models)
    app.router.add_post(r"/v1/{endpoint:embeddings|completions|chat/completions}", cold)
    app.router.add_route("*", "/v1/{tail:.*}", other)
