"""`python -m meshserve_placement`: the scheduler (leader-elected) and the activator."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import REGISTRY, generate_latest

from meshserve import logs
from meshserve.store import State
from meshserve.observe import MeshStateCollector
from meshserve.settings import Settings
from meshserve_placement.activator import FORWARD_SECONDS, Activator, build_rest_app
from meshserve_placement import activator_grpc
from meshserve_placement.leader import Scheduler

log = logging.getLogger("meshserve.placement")


async def main() -> None:
    s = Settings.from_env()
    logs.setup("placement", s.log_json)
    state = State.from_url(s.redis_url)
    scheduler = Scheduler(s, state)
    act = Activator(s, state)
    # Mesh-wide cache metrics (capacity, used, cache age, loads) come from this process.
    collector = MeshStateCollector(state)
    REGISTRY.register(collector)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_SECONDS)) as session:
        runner = web.AppRunner(build_rest_app(act, session), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, s.host, s.activator_rest_port, backlog=1024).start()
        gsrv = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        activator_grpc.serve_on(gsrv, act)
        gsrv.add_insecure_port(f"{s.host}:{s.activator_grpc_port}")
        await gsrv.start()

        mapp = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(REGISTRY), content_type="text/plain")

        async def explain(request: web.Request) -> web.Response:
            d = scheduler.last_decisions.get(request.match_info["model"])
            return web.json_response({"leader": scheduler.leading.is_set(), "decision": d.explain() if d else None})

        mapp.router.add_get("/metrics", metrics)
        mapp.router.add_get("/debug/decision/{model}", explain)
        mrunner = web.AppRunner(mapp, access_log=None)
        await mrunner.setup()
        await web.TCPSite(mrunner, "127.0.0.1", s.placement_metrics_port).start()
        log.info("activator on %s:%d (REST) and :%d (gRPC)", s.host, s.activator_rest_port, s.activator_grpc_port)
        try:
            await asyncio.gather(scheduler.run(), act.watch_changes(), collector.run())
        finally:
            await gsrv.stop(1)
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
