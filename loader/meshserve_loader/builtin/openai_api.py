"""OpenAI-compatible endpoints of the built-in runtime (issue 17, item 4).

- POST /v1/embeddings for models that embed text: the `sentence-transformers` format, its
  adapters (`peft`), and a user's class with an `embed(texts)` method. `input` is a string or a
  list of strings; `encoding_format` float (default) or base64 (what the `openai` client asks
  for), little-endian float32 as OpenAI sends it.
- POST /v1/completions and /v1/chat/completions, plain or streamed (server-sent events in
  OpenAI's chunk format), for a user's class with `complete()` or `chat()` (textgen.py); a
  model that generates nothing gets a 400 `unsupported_endpoint` (an unknown one a 404).
- GET /v1/models: the models loaded on this runtime (the gateway's /v1/models, answered by the
  activator, lists what the whole mesh serves).

The model is the gateway's `mm-model-id` header (the concrete id it routed to), else the body's
`model`. Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any, Awaitable, Callable

import numpy as np
from aiohttp import web
from meshserve.headers import MODEL_ID_HEADER
from meshserve.openai_protocol import OpenAIError, body_model, error_body, parse_body
from meshserve_loader.builtin import textgen
from meshserve_loader.builtin.codec import CodecError

MAX_INPUTS = 2048  # OpenAI's own limit on the number of inputs per request
STREAM_AHEAD = 64  # pieces a streaming model may run ahead of the client
# The model a /v1 request was for, for its counter. A typed key where aiohttp has them (3.12+:
# a str key warns there); a str key on the older releases our floor (aiohttp>=3.9) allows.
SERVED: Any = web.RequestKey("served_model", str) if hasattr(web, "RequestKey") else "served_model"


def respond(e: OpenAIError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


def not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{name}' does not exist or is not served here", param="model", code="model_not_found")


def _token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def embed_inputs(body: dict[str, Any]) -> tuple[list[Any], bool]:
    """(the inputs, whether they are token arrays). OpenAI's four forms: a string, a list of
    strings, one token array (a list of ints), a list of token arrays; not mixed."""
    x = body.get("input")
    if isinstance(x, str):
        x = [x]
    elif isinstance(x, list) and x and all(_token(v) for v in x):
        x = [x]
    if not isinstance(x, list) or not x:
        raise OpenAIError(400, "'input' must be a non-empty string, list of strings, token array or list of token arrays", param="input")
    tokens = all(isinstance(v, list) for v in x)
    if tokens:
        if not all(v and all(_token(t) for t in v) for v in x):
            raise OpenAIError(400, "'input': every token array must be a non-empty list of integers", param="input")
    elif not all(isinstance(v, str) for v in x):
        raise OpenAIError(400, "'input' must hold strings or token arrays (lists of integers), not a mix", param="input")
    if len(x) > MAX_INPUTS:
        raise OpenAIError(400, f"'input' has {len(x)} items; at most {MAX_INPUTS} per request", param="input")
    return x, tokens


def embedder(model: Any, tokens: bool = False) -> Callable[[list[Any]], Any] | None:
    """The model's `embed(texts)`, or with `tokens` its `embed_tokens(token_arrays)`, or a user
    class's (UserModel wraps it as `.obj`)."""
    for obj in (model, getattr(model, "obj", None)):
        fn = getattr(obj, "embed_tokens" if tokens else "embed", None)
        if callable(fn):
            return fn
    return None


def embeddings_response(name: str, vectors: np.ndarray, tokens: int, encoding: str) -> dict[str, Any]:
    data = []
    for i, v in enumerate(np.asarray(vectors, dtype=np.float32)):
        emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def add_routes(r: web.RouteTableDef, rt: Any) -> None:
    """The /v1 endpoints over the runtime's model table (`rt`: table.Runtime)."""
    from meshserve_loader.builtin.table import ModelNotFound

    def openai_handler(fn: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Errors in OpenAI's shape and the per-model request counter, for every /v1 POST. The
        handler names the model it served in request[SERVED]."""
        async def handler(request: web.Request) -> web.StreamResponse:
            request[SERVED], code = request.headers.get(MODEL_ID_HEADER, ""), "200"
            try:
                return await fn(request)
            except OpenAIError as e:
                code = str(e.status)
                return respond(e)
            except ModelNotFound:  # unloaded between the look and the run
                code = "404"
                return respond(not_found(request[SERVED]))
            except Exception as e:  # a model's own bug must not take the runtime down
                code = "500"
                return respond(OpenAIError(500, f"model '{request[SERVED]}' failed: {type(e).__name__}: {e}", "server_error"))
            finally:
                if request[SERVED]:
                    rt.m_requests.labels(request[SERVED], code).inc()

        return handler

    def lookup(request: web.Request, body: dict[str, Any]) -> tuple[str, str, Any]:
        """(the name asked for, the model id served, its table entry)."""
        asked = body_model(body)
        # The gateway's header or the body's name, either an id or an alias (Runtime.resolve).
        request[SERVED] = name = rt.resolve(request[SERVED] or asked)
        try:
            return asked, name, rt.get(name)
        except ModelNotFound:
            raise not_found(asked) from None

    @r.post("/v1/embeddings")
    @openai_handler
    async def embeddings(request: web.Request) -> web.Response:
        body = parse_body(await request.read())
        body_model(body)
        texts, tokens = embed_inputs(body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise OpenAIError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}", param="encoding_format")
        asked, name, entry = lookup(request, body)
        fn = embedder(entry.model, tokens)
        if fn is None and tokens and embedder(entry.model) is not None:
            raise OpenAIError(400, f"The model '{asked}' takes text only: send 'input' as strings (token arrays need a model "
                                   "with embed_tokens, as the built-in text formats have)", param="input")
        if fn is None:
            raise OpenAIError(400, f"The model '{asked}' does not support /v1/embeddings: its format gives no embeddings",
                              param="model", code="unsupported_endpoint")
        dims = body.get("dimensions")

        def work(e: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                out = fn(texts)
            except CodecError as err:  # input this model cannot read (token ids outside its vocabulary)
                raise OpenAIError(400, str(err), param="input") from None
            vectors, tokens = out if isinstance(out, tuple) else (out, 0)
            vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
            rt.m_latency.labels(name).observe(time.perf_counter() - t0)
            if dims is not None and dims != vectors.shape[1]:
                raise OpenAIError(400, f"this model's embeddings have {vectors.shape[1]} dimensions; 'dimensions' cannot change that",
                                  param="dimensions")
            return embeddings_response(asked, vectors, int(tokens), encoding)

        return web.json_response(await rt.run(name, work))

    def generation(endpoint: str, chat: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @openai_handler
        async def handler(request: web.Request) -> web.StreamResponse:
            body = parse_body(await request.read())
            body_model(body)
            try:
                req = textgen.parse(body, chat)
            except textgen.GenError as e:
                raise OpenAIError(400, str(e), param=e.param) from None
            asked, name, entry = lookup(request, body)
            if textgen.generator(entry.model, chat) is None:
                raise OpenAIError(400, f"The model '{asked}' does not support {endpoint}: it generates no text (a model class "
                                       "with complete() or chat() does); text models here serve /v1/embeddings",
                                  param="model", code="unsupported_endpoint")
            if req.tokens and textgen.detokenizer(entry.model) is None:
                raise OpenAIError(400, f"The model '{asked}' takes no token arrays as prompts: its class has no "
                                       "detokenize(tokens) method. Send the prompt as text", param="prompt")
            rid = textgen.new_id(chat)
            if req.stream:
                return await stream(request, rt, name, asked, req, rid)

            def work(e: Any) -> dict[str, Any]:
                t0 = time.perf_counter()
                choices, prompt = textgen.generate(e.model, req)
                rt.m_latency.labels(name).observe(time.perf_counter() - t0)
                return textgen.response_body(rid, asked, req, choices, prompt)

            return web.json_response(await rt.run(name, work))

        return handler

    r.post("/v1/completions")(generation("/v1/completions", chat=False))
    r.post("/v1/chat/completions")(generation("/v1/chat/completions", chat=True))

    @r.get("/v1/models")
    async def models(_: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": int(e.loaded_at), "owned_by": "meshserve"} for n, e in rt.models.items()]
        return web.json_response({"object": "list", "data": data})


def sse(doc: Any) -> bytes:
    return b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":")).encode()) + b"\n\n"


async def stream(request: web.Request, rt: Any, name: str, asked: str, req: textgen.GenRequest, rid: str) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format, one per piece as the model yields it, then
    the finish reasons, the usage (with stream_options.include_usage) and `data: [DONE]`. The
    model runs on an inference thread and hands pieces to the loop as they come; a client that
    goes away stops the model at its next piece. An error after the stream started is sent as
    an event with OpenAI's error object, which its client raises."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    cancelled = threading.Event()
    created = int(time.time())

    # Back-pressure: the model runs at most STREAM_AHEAD pieces ahead of what the client took,
    # so a client that reads slowly (or stalls) does not make the queue grow without bound.
    ahead = threading.Semaphore(STREAM_AHEAD)

    def emit(index: int, text: str) -> None:
        while not ahead.acquire(timeout=0.5):
            if cancelled.is_set():
                return  # nobody reads any more; the model stops at its next piece
        loop.call_soon_threadsafe(q.put_nowait, (index, text))

    def work(e: Any) -> tuple[list[textgen.Choice], int]:
        t0 = time.perf_counter()
        out = textgen.generate(e.model, req, emit, cancelled)
        rt.m_latency.labels(name).observe(time.perf_counter() - t0)
        return out

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    task = asyncio.ensure_future(rt.run(name, work))
    # After every piece the thread queued: the future settles through the same loop queue.
    task.add_done_callback(lambda _: q.put_nowait(None))
    try:
        if req.chat:
            for i in range(len(req.inputs) * req.n):
                await resp.write(sse(textgen.chunk(rid, asked, True, created, [textgen.delta(True, i, "", role=True)])))
        while (item := await q.get()) is not None:
            await resp.write(sse(textgen.chunk(rid, asked, req.chat, created, [textgen.delta(req.chat, item[0], item[1])])))
            ahead.release()
        try:
            choices, prompt = await task
        except Exception as e:  # noqa: BLE001 - the status line is gone: the error goes in the stream
            err = OpenAIError(500, f"model '{name}' failed: {type(e).__name__}: {e}", "server_error")
            await resp.write(sse(error_body(str(err), err.type)))
        else:
            for c in choices:
                finish = textgen.delta(req.chat, c.index, None if req.chat else "", c.finish_reason)
                await resp.write(sse(textgen.chunk(rid, asked, req.chat, created, [finish])))
            if req.include_usage:
                await resp.write(sse(textgen.chunk(rid, asked, req.chat, created, [], textgen.usage(prompt, choices))))
        await resp.write(sse(b"[DONE]"))
        await resp.write_eof()
    except ConnectionResetError:  # the client left: nobody to tell
        pass
    finally:
        cancelled.set()  # the client left (or we are done): the model stops at its next piece
    return resp
