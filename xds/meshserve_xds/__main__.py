"""`python -m meshserve_xds`: the xDS server with its debug and metrics endpoints."""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiohttp import web
from prometheus_client import REGISTRY, generate_latest

from envoy.service.discovery.v3 import ads_pb2_grpc
from meshserve import logs
from meshserve import state as st
from meshserve.settings import Settings
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import AdsServer
from meshserve_xds.source import RedisSource

log = logging.getLogger("meshserve.xds")


async def main() -> None:
    s = Settings.from_env()
    logs.setup("xds", s.log_json)
    cache = SnapshotCache()
    ads = AdsServer(cache)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20), ("grpc.keepalive_time_ms", 30_000)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    server.add_insecure_port(f"{s.host}:{s.xds_port}")
    await server.start()

    app = web.Application()

    async def debug_config(_: web.Request) -> web.Response:
        return web.json_response({"gateways": ads.debug(), "groups": {g: {t.rsplit('.', 1)[-1]: {"version": ts.version, "resources": len(ts.resources)} for t, ts in grp.types.items()} for g, grp in cache.groups.items()}})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), content_type="text/plain")

    app.router.add_get("/debug/config", debug_config)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # Debug output binds to loopback only unless configured otherwise.
    await web.TCPSite(runner, "127.0.0.1", s.xds_debug_port).start()
    log.info("xDS (ADS) on %s:%d, debug on 127.0.0.1:%d", s.host, s.xds_port, s.xds_debug_port)
    state = st.State.from_url(s.redis_url)
    try:
        await RedisSource(s, state, cache).run()
    finally:
        await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
