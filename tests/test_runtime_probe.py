"""Kind: integration, real sockets and a real process, no fakes. Placement's liveness probe tells
a paused pod from a gone one by what the runtime's port does: a process stopped by SIGSTOP still
has its connections accepted by the kernel and answers nothing; a dead one refuses."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from meshserve_placement.liveness import ANSWERED
from meshserve_placement.pods import probe_runtime

# A runtime's readiness endpoint, nothing else: binds port 0 and prints the port it got.
_RUNTIME = """
from aiohttp import web
import asyncio, sys

async def main():
    app = web.Application()
    app.router.add_get("/v2/health/ready", lambda _: web.Response())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _stop(pid: int) -> None:
    """SIGSTOP, and wait until every thread is stopped: the signal is delivered asynchronously,
    and a gRPC server's poller thread answered in the meantime."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        for t in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append((t / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


@pytest.fixture()
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def test_a_stopped_runtime_is_paused_and_a_killed_one_refuses(http: aiohttp.ClientSession) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _RUNTIME], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert await probe_runtime(http, "127.0.0.1", port, 0, 0.5) == ANSWERED
        _stop(proc.pid)
        try:
            paused = await probe_runtime(http, "127.0.0.1", port, 0, 0.5)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert paused.accepted and "connection accepted, no answer within 0.5s" in (paused.failure or "")
        assert await probe_runtime(http, "127.0.0.1", port, 0, 0.5) == ANSWERED  # resumed: the same pod again
        proc.kill()
        proc.wait(10)
        gone = await probe_runtime(http, "127.0.0.1", port, 0, 0.5)
        assert gone.failure and not gone.accepted
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_port_nobody_listens_on_is_gone(http: aiohttp.ClientSession) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused, and no one else gets the port
        port = s.getsockname()[1]
        rest = await probe_runtime(http, "127.0.0.1", port, 0, 0.5)
        grpc = await probe_runtime(http, "127.0.0.1", 0, port, 0.5)
    assert rest.failure and not rest.accepted
    assert grpc.failure and not grpc.accepted


# A gRPC server with no services (a ModelMesh SPI runtime serves gRPC only): port 0, printed.
_GRPC_RUNTIME = """
import asyncio, grpc

async def main():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def test_a_stopped_grpc_only_runtime_is_paused(http: aiohttp.ClientSession) -> None:
    """A TCP connect alone, the probe before, passed for a stopped process: the pod was kept for
    the loader's 30 s grace instead of the paused pod's."""
    proc = subprocess.Popen([sys.executable, "-c", _GRPC_RUNTIME], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert await probe_runtime(http, "127.0.0.1", 0, port, 0.5) == ANSWERED
        _stop(proc.pid)
        try:
            paused = await probe_runtime(http, "127.0.0.1", 0, port, 0.5)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert paused.accepted and "no HTTP/2 frame within 0.5s" in (paused.failure or ""), paused
        assert await probe_runtime(http, "127.0.0.1", 0, port, 0.5) == ANSWERED
    finally:
        proc.kill()
        proc.wait(10)
