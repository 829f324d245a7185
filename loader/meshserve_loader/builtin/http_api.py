"""The built-in runtime's REST listeners: the data app (KServe v2 inference, health, stats,
metrics, the OpenAI endpoints) on the pod address, and the control app (the repository API) on
127.0.0.1. Request bodies are decoded here, bounded (decode_body)."""

from __future__ import annotations

import json
import logging
import zlib
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import generate_latest

from meshserve.headers import AWAIT_LOAD_HEADER
from meshserve.httpbody import drain
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_loader.builtin import binary, codec, payloads
from meshserve_loader.builtin.formats import ModelLoadError
from meshserve_loader.builtin.table import REPOSITORY_ELSEWHERE, MODEL_ID_HEADER, Entry, LoadTimeout, ModelNotFound, PathRefused, Runtime

log = logging.getLogger("meshserve.runtime")

MAX_BODY_BYTES = MAX_REQUEST_BYTES


class BodyTooLarge(ValueError):
    """A request body that decompresses to more than MAX_BODY_BYTES."""


class UnsupportedEncoding(ValueError):
    """A Content-Encoding the runtime does not decode."""


# zlib's wbits per HTTP content coding: gzip framing, and zlib framing for "deflate" (RFC 9110).
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(raw: bytes, encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body with its Content-Encoding undone, never more than `limit` bytes.

    Called on an inference thread: aiohttp's own decompression runs on the event loop and a
    gzip bomb stalled the whole runtime (health included) for seconds. Decoding stops at
    limit + 1 bytes of output, so a bomb costs at most that much memory and time."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return raw
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body")
    out: list[bytes] = []
    size, data = 0, raw
    # gzip allows several members back to back (`cat a.gz b.gz`); each round decodes one.
    while data:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit - size + 1)
        except zlib.error as e:
            raise codec.CodecError(f"request body is not valid {coding} data ({e}); is Content-Encoding right?") from None
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body decompresses to more than the {limit >> 20} MiB limit")
        out.append(chunk)
        if not d.eof:
            raise codec.CodecError(f"request body is truncated {coding} data")
        data = d.unused_data
    return b"".join(out)


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


CONTROL_HOST = "127.0.0.1"


def _add_read_only(r: web.RouteTableDef, rt: Runtime) -> None:
    """Health and stats on both listeners: placement probes and polls them on the data port,
    the loader on its own."""

    @r.get("/v2/health/live")
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @r.get("/v2/health/ready")
    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    @r.get("/v2/meshserve/stats")
    async def stats(request: web.Request) -> web.Response:
        # ?since=<unix time>: only the models used since then (the loader's usage report).
        since = request.query.get("since")
        try:
            return web.json_response(rt.stats(float(since) if since else None))
        except ValueError:
            return _err(400, f"since must be a unix time, not {since!r}")


def build_control_app(rt: Runtime) -> web.Application:
    """The loader's API: the repository extension plus health and stats. Bound to loopback only
    (`serve`): whoever can load can read any allowed file back through a `string` model."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    r = web.RouteTableDef()

    @r.post("/v2/repository/index")
    async def index(_: web.Request) -> web.Response:
        return web.json_response([{"name": n, "state": "READY"} for n in rt.models])

    @r.post("/v2/repository/models/{name}/load")
    async def load(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = json.loads(await request.read() or b"{}")
            params = body.get("parameters") or {}
            size = await rt.load(name, str(params.get("format", "")), str(params["path"]), params)
        except (ValueError, KeyError, TypeError) as e:
            return _err(400, f"load needs JSON {{'parameters': {{'path', 'format'}}}}: {e}")
        except PathRefused as e:
            log.warning("refused load of %s: %s", name, e)
            return _err(403, str(e))
        except ModelLoadError as e:
            return _err(400, str(e))
        except LoadTimeout as e:
            return _err(504, str(e))
        except Exception as e:
            log.exception("load failed for %s", name)
            return _err(500, f"load of '{name}' failed: {type(e).__name__}: {e}")
        return web.json_response({"name": name, "size_bytes": size})

    @r.post("/v2/repository/models/{name}/unload")
    async def unload(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not rt.unload(name):
            return _err(404, f"model '{name}' is not loaded")
        return web.json_response({})

    _add_read_only(r, rt)
    app.add_routes(r)
    return app


def awaiting_load(rt: Runtime) -> Any:
    """A request the activator sent ahead of its model's load waits here for the load to end
    (Runtime.await_load) before its handler looks the model up."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        await rt.await_sent_ahead(request.headers.get(MODEL_ID_HEADER), request.headers.get(AWAIT_LOAD_HEADER),
                                  gone=lambda: request.transport is None or request.transport.is_closing())
        return await handler(request)

    return middleware


def _record_rest(sink: payloads.PayloadSink, name: str, seen: list[Any], code: str, request: web.Request) -> None:
    """A REST inference, to the payload processors as the gRPC messages ModelMesh's REST proxy
    would have made of it (encoded later, on the payload thread)."""
    req = seen[0]
    out = seen[1] if len(seen) > 1 else None
    sink.record(name, lambda: binary.grpc_request(name, req).SerializeToString(),
                (lambda: codec.encode_grpc_response(name, req.id, out).SerializeToString()) if out is not None else None,
                payloads.status_of_http(int(code)), request.headers.items())


def build_rest_app(rt: Runtime) -> web.Application:
    # No automatic decompression: aiohttp would inflate on the event loop (decode_body).
    app = web.Application(client_max_size=MAX_BODY_BYTES, handler_args={"auto_decompress": False},
                          middlewares=[awaiting_load(rt)])
    r = web.RouteTableDef()

    def model_name(request: web.Request) -> str:
        # The gateway's header, else the path's name; either may be an alias (Runtime.resolve).
        return rt.resolve(request.headers.get(MODEL_ID_HEADER) or request.match_info["name"])

    @r.get("/v2")
    async def server_md(_: web.Request) -> web.Response:
        # The repository API is not on this port (the loopback control port has it).
        return web.json_response({"name": rt.name, "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    @r.get("/v2/models/{name}")
    @r.get("/v2/models/{name}/versions/{version}")
    async def model_md(request: web.Request) -> web.Response:
        try:
            return web.json_response(rt.metadata(model_name(request)))
        except ModelNotFound as e:
            return _err(404, str(e))

    @r.get("/v2/models/{name}/ready")
    @r.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: web.Request) -> web.Response:
        name = model_name(request)
        if name not in rt.models:
            return _err(404, f"model '{name}' is not loaded on this runtime")
        return web.json_response({"name": name, "ready": True})

    @r.post("/v2/models/{name}/infer")
    @r.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: web.Request) -> web.Response:
        name = model_name(request)
        code = "200"
        seen: list[Any] = []  # the decoded request, then its outputs: for the payload processors
        try:
            raw = await request.read()
            encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
            header_len = request.headers.get(binary.HEADER)

            def work(e: Entry) -> tuple[bytes, int | None]:
                data = decode_body(raw, encoding)
                if header_len is not None:  # Triton's binary tensor extension
                    req, wants = binary.decode_request(data, binary.parse_header_length(header_len, len(data)))
                else:
                    req = codec.decode_json_request(data)
                    # Binary outputs can be asked for by a plain JSON request too.
                    wants = binary.output_wants(json.loads(data)) if b"binary_data" in data else binary.OutputWants()
                if rt.payloads is not None:
                    seen.append(req)
                out = rt.infer(name, req, e)
                if rt.payloads is not None:
                    seen.append(out)
                return binary.encode_response(name, req, out, wants)

            body, json_len = await rt.run(name, work)
            if json_len is None:
                return web.Response(body=body, content_type="application/json")
            return web.Response(body=body, content_type="application/octet-stream", headers={binary.HEADER: str(json_len)})
        except ModelNotFound as e:
            code = "404"
            return _err(404, str(e))
        except codec.CodecError as e:
            code = "400"
            return _err(400, str(e))
        except web.HTTPRequestEntityTooLarge:
            code = "413"
            await drain(request)
            return _err(413, f"request body is larger than the {MAX_BODY_BYTES >> 20} MiB limit")
        except BodyTooLarge as e:
            code = "413"
            return _err(413, str(e))
        except UnsupportedEncoding as e:
            code = "415"
            return _err(415, str(e))
        except Exception as e:  # a model's own bug must not take the runtime down
            code = "500"
            log.exception("inference failed for %s", name)
            return _err(500, f"model '{name}' failed: {type(e).__name__}: {e}")
        finally:
            rt.m_requests.labels(name, code).inc()
            if rt.payloads is not None and seen:
                _record_rest(rt.payloads, name, seen, code, request)

    @r.route("*", "/v2/repository{tail:.*}")
    async def repository(_: web.Request) -> web.Response:
        # Said plainly rather than a bare 404, so whoever drives this runtime finds the right port.
        return _err(403, REPOSITORY_ELSEWHERE)

    from meshserve_loader.builtin import openai_api

    openai_api.add_routes(r, rt)  # /v1/embeddings and friends (issue 17)
    _add_read_only(r, rt)

    @r.get("/metrics")
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(rt.registry), content_type="text/plain")

    app.add_routes(r)

    async def no_such_endpoint(request: web.Request) -> web.Response:
        # In v2 error JSON: aiohttp's own "404: Not Found" text broke tritonclient, which
        # parses every error body (get_model_config, a Triton extension, met it).
        extension = " (Triton's model configuration and statistics extensions are not served)" if request.path.endswith(("/config", "/stats")) else ""
        return _err(404, f"no such endpoint: {request.method} {request.path}{extension}; see the KServe v2 protocol (/v2/models/<name>/infer)")

    app.router.add_route("*", "/{tail:.*}", no_such_endpoint)  # last: every route above wins
    return app
