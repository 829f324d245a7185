"""`python -m meshserve_loader`'s process: the pod's server started through its adapter, the
agent's loops, the metrics listener, and a drain on SIGTERM (none on SIGINT)."""

from __future__ import annotations

import asyncio
import logging
import signal

import aiohttp

from meshserve.settings import Settings
from meshserve.store import State
from meshserve_loader.agent import Agent

log = logging.getLogger("meshserve.loader")


async def run(settings: Settings, index: int) -> None:
    from meshserve_loader.pod import build_pod

    async with aiohttp.ClientSession() as session:
        built = await build_pod(settings, index, session)
        state = State.from_url(settings.redis_url)
        agent = Agent(settings, built.pod, built.server, state, load_timeout=built.load_timeout, metrics=built.metrics)
        runner = await built.metrics.serve(settings.host, settings.pod_ports(index)[2])
        log.info("pod %s: REST %d, gRPC %d, loader metrics %d", built.pod.id, built.pod.rest_port, built.pod.grpc_port,
                 runner.addresses[0][1] if runner.addresses else 0)
        stop = asyncio.Event()
        drain = True
        loop = asyncio.get_running_loop()

        def interrupted() -> None:
            nonlocal drain
            drain = False
            stop.set()

        # SIGTERM is a pod's preStop: drain first. SIGINT (Ctrl-C, or `meshserve up` stopping
        # every process at once) stops at once.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            await built.server.wait_ready()
            await agent.register()
            tasks = [asyncio.create_task(c) for c in (agent.heartbeat_loop(), agent.usage_loop(), agent.order_loop(), agent.watch_runtime())]
            await stop.wait()
            if drain:
                await agent.drain(settings.drain_timeout_seconds)
            for t in tasks:
                t.cancel()
        finally:
            await built.server.stop()
            await runner.cleanup()
