"""A protocol stand-in for Triton's HTTP model-repository API, for tests. It is NOT Triton.

Real Triton can't run on these machines (no package; it is the nvcr.io/nvidia/tritonserver
container). This small aiohttp server answers the endpoints meshserve's TritonClient uses the way
Triton documents them (docs/protocol/extension_model_repository.md, extension_statistics.md) and
the way its HTTP server behaves where the docs are silent (src/http_server.cc):

- `POST /v2/repository/index`: every model folder in the repository; READY ones with a version,
  unloaded ones UNAVAILABLE with reason "unloaded", never-loaded ones by name only.
- `POST /v2/repository/models/{name}/load`: loads `<repo>/<name>/` from the repository only (no
  path from the client). Load parameters other than "config" and "file:..." (strings) are errors,
  as in Triton. A config.pbtxt `name` that differs from the folder is an error. The newest
  numeric version folder is used; the model file is the backend's default name. Only the
  onnxruntime backend really loads (with onnxruntime); other backends answer an error.
- `POST /v2/repository/models/{name}/unload`: 200 even for unknown models, and, like Triton, the
  model leaves READY shortly *after* the answer.
- `GET /v2/health/ready`, `GET /v2/models/stats`, `POST /v2/models/{name}/infer` (v2 JSON `data`).
- Errors are HTTP 400 with `{"error": "..."}`.

Test hooks (not Triton): a model whose name starts with "ghost" answers its load with 200 but is
never READY; `--ready-after S` answers 503 on /v2/health/ready for the first S seconds.

    python tests/triton_standin.py --repo DIR --port N   (N 0: any free port, printed as `port P`)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

DEFAULT_FILES = {"onnxruntime": "model.onnx", "pytorch": "model.pt", "tensorflow": "model.savedmodel", "tensorrt": "model.plan", "python": "model.py"}
V2_TYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
NP_TYPES = {v: k for k, v in V2_TYPES.items()}


def _field(pbtxt: str, key: str) -> str | None:
    # Top-level scalar fields only: good enough for the minimal configs the loader writes.
    m = re.search(rf'^\s*{key}\s*:\s*"?([^"\n]*)"?\s*$', pbtxt, re.M)
    return m.group(1) if m else None


class Standin:
    def __init__(self, repo: Path, ready_after: float = 0.0):
        self.repo = repo
        self.started = time.monotonic()
        self.ready_after = ready_after
        self.loaded: dict[str, dict[str, Any]] = {}  # name -> {session, version, count, last}
        self.unloaded: set[str] = set()

    def err(self, message: str, status: int = 400) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def ready(self, _: web.Request) -> web.Response:
        if time.monotonic() - self.started < self.ready_after:
            return web.Response(status=503)
        return web.Response(status=200)

    async def index(self, request: web.Request) -> web.Response:
        body = await request.read()
        want_ready = bool(body) and bool((await request.json()).get("ready"))
        out = []
        for d in sorted(p for p in self.repo.iterdir() if p.is_dir() and not p.name.startswith(".")) if self.repo.exists() else []:
            if d.name in self.loaded:
                out.append({"name": d.name, "version": self.loaded[d.name]["version"], "state": "READY"})
            elif want_ready:
                continue
            elif d.name in self.unloaded:
                out.append({"name": d.name, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"})
            else:
                out.append({"name": d.name})
        return web.json_response(out)

    async def load(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        if body:
            try:
                params = (await request.json()).get("parameters") or {}
            except ValueError as e:
                return self.err(f"failed to parse the request JSON buffer: {e}")
            for k, v in params.items():
                if not isinstance(v, str):
                    return self.err(f"parameter '{k}' is not a string")  # Triton: MemberAsString fails
                if k != "config" and not k.startswith("file:"):
                    return self.err("unexpected error on creating Triton parameter")
        d = self.repo / name
        if not d.is_dir():
            return self.err(f"failed to load '{name}', failed to poll from model repository")
        config = (d / "config.pbtxt").read_text() if (d / "config.pbtxt").exists() else ""
        declared = _field(config, "name")
        if declared is not None and declared != name:
            return self.err(f"failed to load '{name}', model configuration name '{declared}' does not match the model directory '{name}'")
        versions = sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not versions:
            return self.err(f"failed to load '{name}', no version is available")
        vdir = versions[-1]
        backend = _field(config, "backend") or {"onnxruntime_onnx": "onnxruntime"}.get(_field(config, "platform") or "", "")
        if not backend:  # Triton's auto-complete guesses the backend from the default file names
            backend = next((b for b, f in DEFAULT_FILES.items() if (vdir / f).exists()), "")
        if name.startswith("ghost"):
            return web.json_response({})
        if backend != "onnxruntime":
            return self.err(f"failed to load '{name}' version {vdir.name}: Invalid argument: stand-in serves onnxruntime only, not '{backend or 'unknown'}'")
        f = vdir / DEFAULT_FILES[backend]
        if not f.exists():
            return self.err(f"failed to load '{name}' version {vdir.name}: Internal: unable to find '{f}'")
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        try:
            sess = await asyncio.to_thread(ort.InferenceSession, str(f), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a bad model is the client's error
            return self.err(f"failed to load '{name}' version {vdir.name}: Internal: onnx runtime error: {e}")
        self.loaded[name] = {"session": sess, "version": vdir.name, "count": 0, "last": 0}
        self.unloaded.discard(name)
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        async def later() -> None:  # Triton answers before the model is gone
            await asyncio.sleep(0.3)
            if self.loaded.pop(name, None) is not None:
                self.unloaded.add(name)

        asyncio.get_running_loop().create_task(later())
        return web.json_response({})

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response({"model_stats": [
            {"name": n, "version": m["version"], "last_inference": m["last"], "inference_count": m["count"], "execution_count": m["count"]}
            for n, m in self.loaded.items()
        ]})

    async def infer(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        m = self.loaded.get(name)
        if m is None:
            return self.err(f"Request for unknown model: '{name}' is not found")
        body = await request.json()
        sess = m["session"]
        feeds = {}
        for spec, t in zip(sess.get_inputs(), body.get("inputs") or []):
            feeds[spec.name] = np.asarray(t["data"], dtype=NP_TYPES.get(t["datatype"], "float32")).reshape(t["shape"])
        outs = sess.run(None, feeds)
        m["count"] += 1
        m["last"] = int(time.time() * 1000)
        return web.json_response({"model_name": name, "model_version": m["version"], "outputs": [
            {"name": o.name, "datatype": V2_TYPES.get(str(np.asarray(v).dtype), "FP32"), "shape": list(np.asarray(v).shape),
             "data": np.asarray(v).reshape(-1).tolist()}
            for o, v in zip(sess.get_outputs(), outs)
        ]})

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/v2/health/ready", self.ready),
            web.get("/v2/health/live", lambda _: web.Response(status=200)),
            web.post("/v2/repository/index", self.index),
            web.post("/v2/repository/models/{name}/load", self.load),
            web.post("/v2/repository/models/{name}/unload", self.unload),
            web.get("/v2/models/stats", self.stats),
            web.post("/v2/models/{name}/infer", self.infer),
        ])
        return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True, help="0: any free port, printed on stdout once bound")
    ap.add_argument("--ready-after", type=float, default=0.0)
    a = ap.parse_args()
    asyncio.run(_serve(Standin(a.repo, a.ready_after).app(), a.port))


async def _serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"port {runner.addresses[0][1]}", flush=True)  # the test reads the port it got
    try:
        await asyncio.Event().wait()  # until SIGTERM ends the process
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
