"""Kind: unit (the activator's /v1 front in process over an in-memory fake of the Activator's
hold-and-forward; the pods are real aiohttp servers on 127.0.0.1). A streamed answer is relayed
as the pod sends it, not read whole first; a runtime without /v1 (MLServer answers 404
`{"detail": "Not Found"}`) is a plain 400, not a copy to wait for again; a traffic split's
branch to a cold model is served as that model (mm-model-id wins over the body's name)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshserve.model import Pod
from meshserve_placement import openai_routes

GAP = 0.2  # seconds between the pod's events


class FakeActivator:
    """The two calls the /v1 front makes: resolve a name, then hold and forward (once)."""

    def __init__(self, pod: Pod):
        self.pod, self.cold_requests, self.resolved = pod, 0, []

    async def resolve(self, name: str) -> str:
        self.resolved.append(name)
        return f"{name}__isvc-1"

    async def serve_cold(self, model_id: str, protocol: str, t0: float, send: Any) -> Any:
        status, out = await send(self.pod)
        return out


def pod_app() -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"] == "mlserver-model":
            return web.json_response({"detail": "Not Found"}, status=404)
        if not body.get("stream"):
            return web.json_response({"model": request.headers.get("mm-model-id")})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f'data: {{"n": {i}}}\n\n'.encode())
            await asyncio.sleep(GAP)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


def test_streams_are_relayed_unbuffered_and_runtimes_without_v1_are_a_400() -> None:
    async def go() -> None:
        async with TestServer(pod_app(), host="127.0.0.1") as pod_server, aiohttp.ClientSession() as session:
            act = FakeActivator(Pod("p0", "127.0.0.1", pod_server.port, 0, 1))
            app = web.Application()
            openai_routes.add_routes(app, act, session)
            async with TestClient(TestServer(app, host="127.0.0.1")) as c:
                r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
                assert r.status == 200 and r.content_type == "text/event-stream"
                arrived = []
                async for line in r.content:
                    if line.startswith(b"data: "):
                        arrived.append((time.monotonic(), line.strip()))
                assert [x[1] for x in arrived] == [b'data: {"n": 0}', b'data: {"n": 1}', b'data: {"n": 2}', b"data: [DONE]"]
                # The first event came about 3 gaps before the end: passed on as it came.
                assert arrived[-1][0] - arrived[0][0] > 2 * GAP, arrived

                r = await c.post("/v1/completions", json={"model": "mlserver-model", "prompt": "x"})
                err = (await r.json())["error"]
                assert r.status == 400 and err["code"] == "unsupported_endpoint" and "MLServer" in err["message"]

                r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers={"mm-model-id": "canary__isvc-2"})
                assert r.status == 200 and act.resolved[-1] == "canary__isvc-2"

    asyncio.run(go())
