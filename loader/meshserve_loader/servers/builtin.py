"""The built-in runtime as the agent sees it: KServe v2 REST with the repository extension,
plus our stats endpoint (per-model request counts and sizes the runtime measured). `base_url` is
the runtime's control listener (127.0.0.1, Settings.pod_control_port), the only one that serves
the repository API.

`BuiltinAdapter` starts it beside the agent (`meshserve up`) with `--ports-file`: the runtime
writes the ports its three listeners bound (port 0 when MESHSERVE_RUNTIME_BASE_PORT=0) once all
listen, and the pod advertises those. In a cluster it is the container beside the loader, on the
fixed pod ports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers.base import Adapter, Endpoints, wait_http_ready


@dataclass
class RuntimeClient:
    base_url: str
    session: aiohttp.ClientSession
    kind: str = "builtin"

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await wait_http_ready(self.session, self.base_url, timeout, "runtime", 0.1)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        # The runtime gets the timeout too: it gives up on the load then (freeing itself for the
        # next one) instead of finishing it for nobody.
        async with self.session.post(
            f"{self.base_url}/v2/repository/models/{model_id}/load",
            json={"parameters": {**params, "timeout_seconds": timeout}},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            body = await r.json(content_type=None)
            if r.status == 504:  # the runtime's own timeout: the same failure as ours
                raise asyncio.TimeoutError(body.get("error") if isinstance(body, dict) else "load timed out")
            if r.status != 200:
                raise RuntimeError(body.get("error") if isinstance(body, dict) else f"HTTP {r.status}")
            return int(body.get("size_bytes") or 0)

    async def unload(self, model_id: str) -> None:
        async with self.session.post(f"{self.base_url}/v2/repository/models/{model_id}/unload") as r:
            if r.status not in (200, 404):
                raise RuntimeError(f"unload of {model_id} failed: HTTP {r.status}")

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base_url}/v2/meshserve/stats") as r:
            return await r.json() if r.status == 200 else {}

    async def used_since(self, since: float) -> dict[str, Any]:
        """The counters of the models used at or after `since` only."""
        async with self.session.get(f"{self.base_url}/v2/meshserve/stats", params={"since": repr(since)}) as r:
            return await r.json() if r.status == 200 else {}


def builtin_argv(index: int, ports_file: Path | None = None) -> list[str]:
    # The index last: operators (and e2e/test_loader_restart.py) find pod N's runtime by it.
    return [sys.executable, "-m", "meshserve_loader.builtin", *(["--ports-file", str(ports_file)] if ports_file is not None else []),
            "--index", str(index)]


async def read_ports(path: Path, process: RuntimeProcess, timeout: float = 120.0) -> dict[str, int]:
    """The ports the runtime bound, once it wrote them ({rest, grpc, control}). Raises when the
    process exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not process.alive():
            raise RuntimeError(f"the built-in runtime exited (code {process.proc.returncode if process.proc else '?'}) before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the built-in runtime wrote no ports to {path} within {timeout:g}s")
        await asyncio.sleep(0.05)
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


log = logging.getLogger("meshserve.loader")


class BuiltinAdapter(Adapter):
    kind = "builtin"
    resolves_names = True  # table.py Runtime.resolve; the loader passes each model's alias
    awaits_loads = True  # table.py Runtime.await_load

    async def start(self) -> Endpoints:
        s = self.settings
        if not s.loader_runs_runtime:
            # The repository API is on the runtime's loopback control port, never the pod
            # address: the loader shares the runtime's network namespace (the pod's in Kubernetes).
            rest, grpc_port, _ = s.pod_ports(self.index)
            self.client = RuntimeClient(f"http://127.0.0.1:{s.pod_control_port(self.index)}", self.session)
            self.endpoints = Endpoints(rest, grpc_port)
            return self.endpoints
        self._ports_file = s.data_dir / "ports" / f"{self.pod_id}-runtime.json"
        self._ports_file.parent.mkdir(parents=True, exist_ok=True)
        # Our settings, as the runtime reads them (the same pod index, ports and model roots);
        # its output goes where ours does (`meshserve up` prefixes and shows it).
        self.process = RuntimeProcess(f"runtime-{self.index}", builtin_argv(self.index, self._ports_file), s.as_env())
        return await self._launch()

    async def restart(self) -> Endpoints:
        # On port 0 the new process binds new ports: the agent registers the pod with them.
        endpoints = await self._launch()
        await self.client.wait_ready()
        return endpoints

    async def _launch(self) -> Endpoints:
        """Start it and read its ports. A runtime that exits before it listens is started again
        (backoff with jitter, for up to a minute): on fixed ports the one before it (killed with
        a loader that died) may still hold them for the second it takes to stop."""
        assert self.process is not None
        async for attempt in AsyncRetrying(wait=wait_random_exponential(multiplier=0.2, max=2.0), stop=stop_after_delay(60),
                                           retry=retry_if_exception_type(RuntimeError), reraise=True,
                                           before_sleep=lambda rs: log.warning("%s; starting it again", rs.outcome.exception())):
            with attempt:
                self._ports_file.unlink(missing_ok=True)
                await self.process.start()
                got = await read_ports(self._ports_file, self.process)
        self.client = RuntimeClient(f"http://127.0.0.1:{got['control']}", self.session)
        self.endpoints = Endpoints(got["rest"], got["grpc"])
        return self.endpoints
