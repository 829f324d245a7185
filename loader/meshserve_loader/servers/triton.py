"""Triton Inference Server as the pod's runtime, through the KServe v2 model repository API.

The loader lays out each model in Triton's model repository the way Triton expects it
(triton_layout.py), then calls
`POST /v2/repository/models/{id}/load` (Triton runs with `--model-control-mode=explicit`, so it
loads nothing else) and `.../unload`, lists what it holds with `POST /v2/repository/index`, and
waits for `GET /v2/health/ready`.

Triton's load request takes no parameters of ours: it accepts only "config" and "file:..."
parameters (any other is an error), so the path and format travel through the layout alone.

Size: Triton reports no per-model memory, so the size is the resident-memory delta of Triton's
process tree when the agent runs Triton itself; when Triton is its own container (cluster mode)
the loader cannot see its processes and the prediction is reported instead (load returns 0).
Recency comes from Triton's own per-model statistics (`GET /v2/models/stats`).

Triton is never run on these machines: there is no Triton to install here (PyPI's `tritonserver`
is a placeholder, Debian has no package); it runs as the container nvcr.io/nvidia/tritonserver.
The client is tested against a protocol stand-in (tests/triton_standin.py).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import aiohttp

from meshserve_loader.memory import tree_rss_bytes
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers.base import Adapter, Endpoints, wait_http_ready
from meshserve_loader.servers.mlserver import _error_text
from meshserve_loader.servers.triton_layout import LayoutError, lay_out

if TYPE_CHECKING:
    from meshserve.settings import Settings

log = logging.getLogger("meshserve.loader.triton")

__all__ = ["LayoutError", "TritonAdapter", "TritonClient", "lay_out", "repository_dir", "triton_argv"]


# The client the agent drives


@dataclass
class TritonClient:
    base_url: str
    session: aiohttp.ClientSession
    repo: Path  # Triton's --model-repository, as this process sees it (the same path in both containers)
    pid: Callable[[], int] = lambda: 0  # Triton's process when the agent runs it, for the RSS delta (0: unknown)
    allow_executable: bool = True
    unload_wait: float = 10.0  # Triton's unload returns before the model is gone; wait this long for it
    kind: str = "triton"

    def __post_init__(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        # Loads measured by RSS can't overlap; unmeasured ones (Triton in its own container) can.
        self._measure_lock = asyncio.Lock()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await wait_http_ready(self.session, self.base_url, timeout, "Triton", 0.2)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        path = Path(str(params["path"]))
        fmt = str(params.get("format", ""))
        try:
            lay_out(self.repo, model_id, fmt, path, self.allow_executable)
        except (LayoutError, OSError) as e:
            raise RuntimeError(f"cannot lay out {model_id} for Triton: {e}") from None
        pid = self.pid()
        if pid:
            async with self._measure_lock:
                before = tree_rss_bytes(pid)
                await self._load(model_id, timeout)
                return max(tree_rss_bytes(pid) - before, 0)
        await self._load(model_id, timeout)
        return 0  # not measurable from here: the agent reports the prediction

    async def _load(self, model_id: str, timeout: float) -> None:
        try:
            # No body: Triton's load takes only "config" and "file:" parameters.
            async with self.session.post(
                f"{self.base_url}/v2/repository/models/{model_id}/load", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"Triton could not load {model_id}: HTTP {r.status}: {_error_text(await r.text())}")
            entry = (await self._index()).get(model_id)
            if entry is None or entry.get("state") != "READY":
                how = f"state {entry.get('state') or 'unknown'}" + (f": {entry['reason']}" if entry and entry.get("reason") else "") if entry else "not listed"
                raise RuntimeError(f"Triton answered the load of {model_id} but its repository index does not show it READY ({how})")
        except RuntimeError:
            await self._forget(model_id)  # Triton holds nothing for it, and the folder goes
            raise
        except BaseException:
            # Timed out or cancelled: Triton may still be loading it. The folder goes; the agent
            # watches for a late finish and unloads it then (Agent._unload_quietly).
            shutil.rmtree(self.repo / model_id, ignore_errors=True)
            raise

    async def _forget(self, model_id: str) -> None:
        try:
            async with self.session.post(
                f"{self.base_url}/v2/repository/models/{model_id}/unload", timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            log.debug("unload of failed load %s: %s", model_id, e)
        shutil.rmtree(self.repo / model_id, ignore_errors=True)

    async def unload(self, model_id: str) -> None:
        async with self.session.post(f"{self.base_url}/v2/repository/models/{model_id}/unload") as r:
            ok = r.status == 200
            err = "" if ok else f"HTTP {r.status}: {_error_text(await r.text())}"
        if not ok and model_id in await self.held():
            raise RuntimeError(f"Triton could not unload {model_id}: {err}")
        # Triton's unload returns before the model is gone: wait (bounded), so the memory is
        # free when we report it free.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unload_wait
        while model_id in await self.held():
            if loop.time() > deadline:
                log.warning("Triton still lists %s READY %gs after its unload", model_id, self.unload_wait)
                break
            await asyncio.sleep(0.1)
        shutil.rmtree(self.repo / model_id, ignore_errors=True)

    async def _index(self) -> dict[str, dict[str, Any]]:
        """name -> index entry; a READY version wins over the others of the same model."""
        async with self.session.post(f"{self.base_url}/v2/repository/index", json={}) as r:
            if r.status != 200:
                raise RuntimeError(f"Triton's repository index failed: HTTP {r.status}: {_error_text(await r.text())}")
            doc = await r.json(content_type=None)
        out: dict[str, dict[str, Any]] = {}
        for m in doc if isinstance(doc, list) else []:
            if isinstance(m, dict) and m.get("name") and (m["name"] not in out or m.get("state") == "READY"):
                out[str(m["name"])] = m
        return out

    async def held(self) -> list[str]:
        try:
            index = await self._index()
        except RuntimeError as e:
            log.warning("%s", e)
            return []
        return sorted(n for n, m in index.items() if m.get("state") == "READY")

    async def stats(self) -> dict[str, Any]:
        """The models Triton holds, with its own request counts and last inference time."""
        held = await self.held()
        if not held:
            return {}
        per_model: dict[str, dict[str, Any]] = {}
        try:
            async with self.session.get(f"{self.base_url}/v2/models/stats") as r:
                doc = await r.json(content_type=None) if r.status == 200 else {}
        except (aiohttp.ClientError, ValueError) as e:
            log.debug("Triton model statistics: %s", e)
            doc = {}
        for s in (doc.get("model_stats") if isinstance(doc, dict) else None) or []:
            name = s.get("name") if isinstance(s, dict) else None
            if name not in held:
                continue
            cur = per_model.setdefault(name, {"requests": 0})
            cur["requests"] += int(s.get("inference_count") or 0)
            last = float(s.get("last_inference") or 0) / 1000  # Triton: ms since the epoch
            if last > cur.get("last_used", 0):
                cur["last_used"] = last
        return {m: per_model.get(m, {}) for m in held}


# ---------------------------------------------------------------------------------------------
# Starting it (pod.py)


def repository_dir(settings: "Settings", pod_id: str) -> Path:
    """Triton's --model-repository for a pod. In a cluster, the pod's Triton container must be
    started with this same path, on the volume it shares with the loader."""
    return (settings.data_dir / "triton" / pod_id).resolve()


def triton_argv(exe: str, repo: Path, host: str, rest: int, grpc_port: int, metrics_port: int) -> list[str]:
    return [
        exe,
        f"--model-repository={repo}",
        "--model-control-mode=explicit",  # load and unload only on our orders
        "--strict-model-config=false",  # auto-complete what a config.pbtxt leaves out (deprecated, still read)
        "--strict-readiness=false",  # ready means the server, not "every model loaded"
        f"--http-address={host}",
        f"--http-port={rest}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
    ]


def no_triton_message(runtime: str, settings: "Settings", index: int) -> str:
    rest, grpc_port, _ = settings.pod_ports(index)
    repo = repository_dir(settings, f"pod-{index}")
    return (
        f"runtime {runtime!r} is Triton, and this loader was asked to run it itself (MESHSERVE_LOADER_RUNS_RUNTIME=true, "
        "as `meshserve up` does), but there is no `tritonserver` executable on PATH. Triton can't be installed as a "
        "package here (PyPI's `tritonserver` is a placeholder and Debian has none): it runs as its own container, "
        "nvcr.io/nvidia/tritonserver. In a cluster that container is the runtime pool's model server beside the loader "
        "sidecar (the template is istio/runtime-builtin.yaml; docs/design/loader.md). To point this loader at a Triton "
        f"you run yourself: start it with --model-repository={repo} (the same path, shared with this loader) "
        f"--model-control-mode=explicit --strict-model-config=false --strict-readiness=false --http-port={rest} "
        f"--grpc-port={grpc_port}, reachable at {settings.host}, and run the loader with MESHSERVE_LOADER_RUNS_RUNTIME=false."
    )


class TritonAdapter(Adapter):
    """Pod `index`'s Triton: run by the agent when the loader runs the server (a `tritonserver`
    on PATH), else its own container, reached where every server container is: settings.host on
    the pod's REST port. Triton takes port numbers and reports none: fixed or reserved ports."""

    kind = "triton"

    async def start(self) -> Endpoints:
        s, spec = self.settings, self.spec
        rest, grpc_port, _ = s.pod_ports(self.index)
        repo = repository_dir(s, self.pod_id)
        if not s.loader_runs_runtime:
            url = f"http://{s.host}:{rest}"
            log.info("runtime %s is Triton in its own container at %s, model repository %s", spec.name, url, repo)
            self.client = TritonClient(url, self.session, repo, allow_executable=s.allow_executable_formats)
            self.endpoints = Endpoints(rest, grpc_port)
            return self.endpoints
        exe = shutil.which("tritonserver")
        if exe is None:
            raise SystemExit(no_triton_message(spec.name, s, self.index))
        # A new Triton holds nothing: folders left by an earlier run would only linger.
        shutil.rmtree(repo, ignore_errors=True)
        repo.mkdir(parents=True, exist_ok=True)
        rest, grpc_port, metrics_port = self.server_ports(3, (0, 1, 3))
        self.process = RuntimeProcess(spec.name, triton_argv(exe, repo, s.host, rest, grpc_port, metrics_port), dict(spec.env),
                                      log_path=s.data_dir / f"{self.pod_id}-triton.log")
        await self.process.start()
        process = self.process
        self.client = TritonClient(f"http://{s.host}:{rest}", self.session, repo, pid=lambda: process.pid,
                                   allow_executable=s.allow_executable_formats)
        self.endpoints = Endpoints(rest, grpc_port)
        return self.endpoints
