"""The built-in runtime process: KServe v2 REST (aiohttp) and gRPC (grpcio) over one model table.

The model to serve is the `mm-model-id` header when present (the gateway sets it from the
alias), else the name in the path or message. Loads come through the repository extension,
which is also how the loader drives MLServer and Triton.

Two listeners, because the data port is reachable from every peer of the pod network: the data
port (REST and gRPC, the pod's address) serves inference, health, stats and metrics only; the
repository API (load, unload, index) is on a REST control port bound to 127.0.0.1, which only
the loader beside the runtime reaches. A load must name a path under the runtime's allowed roots
(its pod's disk cache, the PVC root, configured model roots), checked after resolving symlinks
and `..` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
from pathlib import Path

import grpc
from aiohttp import web

from meshserve_loader.builtin import payloads
from meshserve_loader.builtin.grpc_api import GRPC_MAX_MESSAGE, GrpcServicer, add_servicer
from meshserve_loader.builtin.http_api import CONTROL_HOST, build_control_app, build_rest_app
from meshserve_loader.builtin.table import Runtime

log = logging.getLogger("meshserve.runtime")


# The libraries each format's first load imports. A runtime imports them on demand, in the
# load's thread (formats.py), so an idle runtime holds none of them: sklearn and scipy alone are
# ~110 MiB of RSS per runtime, most of `meshserve up`'s idle memory (bench/up_rss.py). The first
# load of a format pays its import instead (docs/design/loader.md has the figures); formats named
# in MESHSERVE_RUNTIME_PREIMPORT are imported at start, for a pod that prefers the memory spent
# to that first load's wait. Sizes do not depend on it: a model's size is its own objects'
# footprint (footprint.py), not an RSS delta that a first import would inflate.
PREIMPORTS: dict[str, tuple[str, ...]] = {
    "sklearn": ("joblib", "sklearn.svm", "sklearn.linear_model", "sklearn.ensemble"),
    "xgboost": ("xgboost",),
    "lightgbm": ("lightgbm",),
    "onnx": ("onnxruntime",),
}


def preimport_modules(formats: "list[str] | tuple[str, ...]") -> list[str]:
    """The modules to import at start for `formats` (unknown formats import nothing)."""
    return [m for f in formats for m in PREIMPORTS.get(f.strip().lower(), ())]


def _preimport(modules: list[str]) -> None:
    from meshserve.extras import needs

    with needs("runtime", "the built-in runtime"):
        for m in modules:
            importlib.import_module(m)


async def serve(host: str, rest_port: int, grpc_port: int, allow_executable: bool = True, load_timeout: float = 0.0,
                control_port: int = 0, allowed_roots: "list[Path] | tuple[Path, ...]" = (), ports_file: Path | None = None,
                preimport: "list[str] | tuple[str, ...]" = (), payload_processors: str = "") -> None:
    """Data listeners on `host` (the pod IP in a cluster), the control listener on 127.0.0.1
    whatever `host` is. Loads only from `allowed_roots`: none given, none succeed. A port of 0
    is the kernel's pick; with `ports_file`, the ports bound are written there once all three
    listen (servers/builtin.py reads it: the loader advertises those). `preimport`: formats
    whose libraries are imported at start, after the listeners are up; loads wait for them.
    `payload_processors`: MESHSERVE_PAYLOAD_PROCESSORS, else ModelMesh's MM_PAYLOAD_PROCESSORS
    from the environment (payloads.py)."""
    roots = tuple(Path(p).resolve() for p in allowed_roots)
    rt = Runtime(allow_executable=allow_executable, load_timeout=load_timeout, allowed_roots=roots)
    rt.payloads = payloads.from_env(os.environ, payload_processors, rt.registry)
    if rt.payloads is not None:
        rt.payloads.start()
    if modules := preimport_modules(preimport):
        rt.warm = asyncio.get_running_loop().run_in_executor(None, _preimport, modules)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", GRPC_MAX_MESSAGE), ("grpc.max_send_message_length", GRPC_MAX_MESSAGE)]
    )
    add_servicer(server, GrpcServicer(rt))
    grpc_bound = server.add_insecure_port(f"{host}:{grpc_port}")
    if not grpc_bound:
        raise OSError(f"gRPC could not listen on {host}:{grpc_port}")
    await server.start()
    runner = web.AppRunner(build_rest_app(rt), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, rest_port, backlog=1024).start()
    control = web.AppRunner(build_control_app(rt), access_log=None)
    await control.setup()
    await web.TCPSite(control, CONTROL_HOST, control_port).start()
    bound = {"rest": runner.addresses[0][1], "grpc": grpc_bound, "control": control.addresses[0][1]}
    if ports_file is not None:
        tmp = ports_file.with_name(ports_file.name + ".tmp")
        tmp.write_text(json.dumps(bound))
        tmp.replace(ports_file)  # whole or absent: the loader polls for it
    log.info("built-in runtime serving REST on %s:%d, gRPC on %s:%d, control (repository API) on %s:%d; loads from %s",
             host, bound["rest"], host, grpc_bound, CONTROL_HOST, bound["control"], ", ".join(map(str, roots)) or "nowhere")
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(1)
        await runner.cleanup()
        await control.cleanup()
        if rt.payloads is not None:
            await rt.payloads.close()
        rt.close()
