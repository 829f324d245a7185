"""What every model-server adapter is to the agent, and how its ports are chosen.

An adapter owns one pod's model server: it starts the server's process when the loader runs it
(`meshserve up`; in a cluster the server is its own container), starts any pass-through in front
of it, waits for it, and says which ports the pod advertises. Then it carries out the agent's
loads, unloads and stats through the server's own protocol client.

Ports. With fixed pod ports (MESHSERVE_RUNTIME_BASE_PORT set, or cluster mode) every listener
gets its fixed port. With MESHSERVE_RUNTIME_BASE_PORT=0 nothing is picked, freed and bound later
(a CI run lost that race: "Address already in use"):
- servers of ours bind port 0 and report what they got: the built-in runtime writes a ports file
  the loader names on its command line (builtin.py), the gRPC pass-through returns its port;
- servers that take a port number and report none (MLServer, Triton) get ports reserved by
  meshserve/ports.py (outside ip_local_port_range, so the kernel never hands them out on its own,
  and held by a cross-process fcntl lock), held from before the server starts until it stops, so
  a restart binds them again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from meshserve import ports as reservations
from meshserve.settings import Settings
from meshserve_loader.metrics import LoaderMetrics
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.serving_runtime import RuntimeSpec


@dataclass(frozen=True)
class Endpoints:
    """The ports the pod advertises to placement (and so to the gateways)."""

    rest: int
    grpc: int


@dataclass(frozen=True)
class Terms:
    """What the server itself says of the pod (the SPI's runtimeStatus); 0: it says nothing."""

    capacity_bytes: int = 0
    max_loading: int = 0
    loading_timeout_ms: int = 0


class Adapter:
    """The interface (one subclass per server type, chosen in servers/__init__.py): start, stop,
    restart, readiness, and the agent's load, unload and stats through `client`."""

    kind = ""
    # The server finds a model by its alias as well as its id (Pod.resolves_names): the built-in.
    resolves_names = False
    # The server holds a request sent with `ms-await-load` until its model's load ends
    # (Pod.awaits_loads): the built-in.
    awaits_loads = False

    def __init__(self, settings: Settings, index: int, spec: RuntimeSpec, session: aiohttp.ClientSession,
                 metrics: LoaderMetrics | None = None):
        self.settings, self.index, self.spec, self.session = settings, index, spec, session
        self.metrics = metrics or LoaderMetrics()
        self.pod_id = settings.pod_name(index)
        self.client: Any = None
        self.process: RuntimeProcess | None = None
        self.terms = Terms()
        self.endpoints = Endpoints(0, 0)
        self._reserved: list[int] = []

    async def start(self) -> Endpoints:
        raise NotImplementedError

    async def restart(self) -> Endpoints:
        """After the server's process died: start it again, wait until it is ready. The ports
        stay (they are fixed or still reserved) unless the adapter says otherwise."""
        assert self.process is not None
        await self.process.start()
        await self.client.wait_ready()
        return self.endpoints

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()
        for p in self._reserved:
            reservations.release(p)
        self._reserved.clear()

    def server_ports(self, n: int, offsets: tuple[int, ...]) -> list[int]:
        """`n` ports for a server that can't report the ones it bound: the pod's REST port plus
        each of `offsets` when ports are fixed, else reserved ones (module doc)."""
        if not self.settings.ephemeral_pod_ports:
            rest = self.settings.pod_ports(self.index)[0]
            return [rest + o for o in offsets[:n]]
        got = [reservations.reserve_port() for _ in range(n)]
        self._reserved += got
        return got

    # The agent's side: what it asks of every server.

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await self.client.wait_ready(timeout)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        return int(await self.client.load(model_id, params, timeout))

    async def unload(self, model_id: str) -> None:
        await self.client.unload(model_id)

    async def stats(self) -> dict[str, Any]:
        return dict(await self.client.stats())

    async def used_since(self, since: float) -> dict[str, Any]:
        """The stats of the models used at or after `since` (a server that cannot say: all of them,
        as `stats`; the agent keeps only those whose counters moved)."""
        ask = getattr(self.client, "used_since", None)
        return dict(await ask(since)) if ask is not None else await self.stats()


async def wait_http_ready(session: aiohttp.ClientSession, base_url: str, timeout: float, what: str, interval: float = 0.1) -> None:
    """Until `GET /v2/health/ready` answers 200 (KServe v2: every HTTP server here speaks it);
    TimeoutError naming the server, its URL and its last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    while True:
        try:
            async with session.get(f"{base_url}/v2/health/ready") as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except aiohttp.ClientError as e:
            last = str(e) or type(e).__name__
        if loop.time() > deadline:
            raise TimeoutError(f"{what} at {base_url} not ready after {timeout:g}s ({last})")
        await asyncio.sleep(interval)
