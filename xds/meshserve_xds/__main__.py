"""`python -m meshserve_xds`: the xDS server with its health, metrics and debug endpoints
(meshserve_xds/health.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from meshserve import logs
from meshserve.store import State
from meshserve.settings import Settings
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.health import Health, bind_hosts, make_app
from meshserve_xds.health import serve as serve_http
from meshserve_xds.server import AdsServer
from meshserve_xds.synced import SyncReporter
from meshserve_xds.source import RedisSource

log = logging.getLogger("meshserve.xds")


def server_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """mTLS for the ADS port when MESHSERVE_XDS_TLS_CERT, _KEY and _CA are set (None: plaintext).
    A client must present a certificate that chains to the CA, or its handshake fails. The files
    are read once, at start: a renewed certificate takes a restart (docs/security.md)."""
    if not s.xds_tls:
        return None
    key, cert, ca = (Path(f).read_bytes() for f in (s.xds_tls_key, s.xds_tls_cert, s.xds_tls_ca))
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def add_port(server: grpc.aio.Server, s: Settings) -> str:
    """Bind the ADS port, TLS or plaintext per the settings; returns which, for the log."""
    creds = server_credentials(s)
    if creds is None:
        server.add_insecure_port(f"{s.host}:{s.xds_port}")
        return "plaintext"
    server.add_secure_port(f"{s.host}:{s.xds_port}", creds)
    return "mTLS"


async def main() -> None:
    s = Settings.from_env()
    logs.setup("xds", s.log_json)
    cache = SnapshotCache()
    ads = AdsServer(cache)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20), ("grpc.keepalive_time_ms", 30_000)])
    ads.add_to(server)  # responses sent as the bytes the streams wrote
    try:
        mode = add_port(server, s)
    except (ValueError, OSError) as e:
        raise SystemExit(f"meshserve xds: {e}") from None
    await server.start()

    state = State.from_url(s.redis_url)
    source = RedisSource(s, state, cache)
    # /healthz is ready once the first snapshot is in the cache (RedisSource.published is set
    # after its first publish); before, it says why not. See meshserve_xds/health.py.
    health = Health(lambda: bool(source.published), state, s.redis_url, lambda: source.rev)

    def debug_config() -> object:
        return {"gateways": ads.debug(), "groups": {g: {t.rsplit('.', 1)[-1]: {"version": ts.version, "resources": len(ts.resources)} for t, ts in grp.types.items()} for g, grp in cache.groups.items()}}

    try:
        runner = await serve_http(make_app(health, debug_config), s.xds_debug_host, s.xds_debug_port)
    except OSError as e:
        raise SystemExit(f"meshserve xds: HTTP listener on {s.xds_debug_host}:{s.xds_debug_port}: {e}") from None
    log.info("xDS (ADS, %s) on %s:%d; /healthz and /metrics on %s:%d, /debug/config on loopback only",
             mode, s.host, s.xds_port, " and ".join(bind_hosts(s.xds_debug_host)), s.xds_debug_port)
    # The revision each gateway's routes reflect, for the loaders' unloads (synced.py).
    reporter = asyncio.create_task(SyncReporter(ads.streams, lambda: source.rev, state).run())
    try:
        await source.run()
    finally:
        reporter.cancel()
        await runner.cleanup()
        await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main())
