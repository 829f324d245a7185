"""The built-in runtime's gRPC listener in-process, for tests that drive a `Runtime` of fakes."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from meshserve_loader.builtin.grpc_api import GrpcServicer, add_servicer
from meshserve_loader.builtin.table import Runtime


@contextlib.asynccontextmanager
async def runtime_channel(rt: Runtime) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `rt`'s gRPC listener on 127.0.0.1 (a port the kernel picks); stopped after."""
    server = grpc.aio.server()
    add_servicer(server, GrpcServicer(rt))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(0)
