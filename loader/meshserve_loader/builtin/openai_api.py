"""OpenAI-compatible endpoints of the built-in runtime (issue 17, item 4).

- POST /v1/embeddings for models that embed text: the `sentence-transformers` format, its
  adapters (`peft`), and a user's class with an `embed(texts)` method. `input` is a string or a
  list of strings; `encoding_format` float (default) or base64 (what the `openai` client asks
  for), little-endian float32 as OpenAI sends it.
- POST /v1/completions and /v1/chat/completions: no built-in format generates text, so a known
  model gets a 400 saying it doesn't serve that endpoint (an unknown one a 404).
- GET /v1/models: the models loaded on this runtime (the gateway's /v1/models, answered by the
  activator, lists what the whole mesh serves).

The model is the gateway's `mm-model-id` header (the concrete id it routed to), else the body's
`model`. Errors are OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Callable

import numpy as np
from aiohttp import web
from meshserve.headers import MODEL_ID_HEADER

MAX_INPUTS = 2048  # OpenAI's own limit on the number of inputs per request


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def response(self) -> web.Response:
        return error_response(self.status, str(self), self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status)


def not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{name}' does not exist or is not served here", param="model", code="model_not_found")


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except ValueError as e:
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object")
    return body


def body_model(body: dict[str, Any]) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise OpenAIError(400, "you must provide a model parameter (a string)", param="model", code="missing_required_parameter" if m is None else None)
    return m


def embed_inputs(body: dict[str, Any]) -> list[str]:
    x = body.get("input")
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, list) or not x:
        raise OpenAIError(400, "'input' must be a non-empty string or list of strings", param="input")
    if not all(isinstance(v, str) for v in x):
        raise OpenAIError(400, "'input' must hold strings: token arrays are not supported by this runtime", param="input")
    if len(x) > MAX_INPUTS:
        raise OpenAIError(400, f"'input' has {len(x)} items; at most {MAX_INPUTS} per request", param="input")
    return x


def embedder(model: Any) -> Callable[[list[str]], Any] | None:
    """The model's `embed(texts)`, or a user class's (UserModel wraps it as `.obj`)."""
    for obj in (model, getattr(model, "obj", None)):
        fn = getattr(obj, "embed", None)
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

    @r.post("/v1/embeddings")
    async def embeddings(request: web.Request) -> web.Response:
        name, code = request.headers.get(MODEL_ID_HEADER, ""), "200"
        try:
            body = parse_body(await request.read())
            asked = body_model(body)
            name = name or asked
            texts = embed_inputs(body)
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise OpenAIError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}", param="encoding_format")
            try:
                entry = rt.get(name)
            except ModelNotFound:
                raise not_found(asked) from None
            fn = embedder(entry.model)
            if fn is None:
                raise OpenAIError(400, f"The model '{asked}' does not support /v1/embeddings: its format gives no embeddings",
                                  param="model", code="unsupported_endpoint")
            dims = body.get("dimensions")

            def work(e: Any) -> dict[str, Any]:
                t0 = time.perf_counter()
                out = fn(texts)
                vectors, tokens = out if isinstance(out, tuple) else (out, 0)
                vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
                rt.m_latency.labels(name).observe(time.perf_counter() - t0)
                if dims is not None and dims != vectors.shape[1]:
                    raise OpenAIError(400, f"this model's embeddings have {vectors.shape[1]} dimensions; 'dimensions' cannot change that",
                                      param="dimensions")
                return embeddings_response(asked, vectors, int(tokens), encoding)

            return web.json_response(await rt.run(name, work))
        except OpenAIError as e:
            code = str(e.status)
            return e.response()
        except ModelNotFound:  # unloaded between the look and the run
            code = "404"
            return not_found(name).response()
        except Exception as e:  # a model's own bug must not take the runtime down
            code = "500"
            return error_response(500, f"model '{name}' failed: {type(e).__name__}: {e}", "server_error")
        finally:
            if name:
                rt.m_requests.labels(name, code).inc()

    def unsupported(endpoint: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = parse_body(await request.read())
                asked = body_model(body)
                if (request.headers.get(MODEL_ID_HEADER) or asked) not in rt.models:
                    raise not_found(asked)
                raise OpenAIError(400, f"The model '{asked}' does not support {endpoint}: the built-in runtime generates no text; "
                                       "it serves /v1/embeddings for text models", param="model", code="unsupported_endpoint")
            except OpenAIError as e:
                return e.response()

        return handler

    r.post("/v1/completions")(unsupported("/v1/completions"))
    r.post("/v1/chat/completions")(unsupported("/v1/chat/completions"))

    @r.get("/v1/models")
    async def models(_: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": int(e.loaded_at), "owned_by": "meshserve"} for n, e in rt.models.items()]
        return web.json_response({"object": "list", "data": data})
