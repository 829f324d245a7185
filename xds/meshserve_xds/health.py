"""xds's HTTP listener: /healthz (readiness), /metrics (Prometheus) and /debug/config.

It binds Settings.xds_debug_host (MESHSERVE_XDS_DEBUG_HOST), loopback by default. In a cluster
it binds the pod IP too (istio/gateway.yaml), so kubelet's readiness probe (rewritten by Istio,
which sends it to the pod IP) and Prometheus reach /healthz and /metrics. /debug/config shows
the whole routing state (model ids, pod addresses), so it answers only connections made to a
loopback address (`kubectl port-forward`, or a shell in the pod), whatever the bind: a request
that reached the pod IP gets 403. The check is on the local address the connection came in on,
not the peer's: behind an Istio sidecar every peer looks like 127.0.0.6.

/healthz answers 200 once the xDS server has built its first snapshot from Redis, and 503 with
the reason before (Redis unreachable, refused the password, or the snapshot is still being
built). Once built it stays 200 when Redis goes away: the server keeps serving its last
snapshot and every Envoy keeps its config, which is better than taking every gateway replica
out of its Service at once (docs/design/kubernetes.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Callable

from aiohttp import web
from prometheus_client import REGISTRY, generate_latest
from redis import exceptions as redis_exc

from meshserve.store import State
from meshserve.settings import redact_url

log = logging.getLogger("meshserve.xds")

LOOPBACK = "127.0.0.1"
PING_TIMEOUT_S = 1.0


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack wildcard bind
    return (mapped or ip).is_loopback


def bind_hosts(debug_host: str) -> list[str]:
    """Where the listener binds: the configured host, and loopback as well when that is a
    single non-loopback address, so `kubectl port-forward` (which dials loopback in the pod)
    still reaches /debug/config. A wildcard (0.0.0.0, ::) covers loopback itself."""
    host = debug_host or LOOPBACK
    if is_loopback(host) or host in ("0.0.0.0", "::", ""):
        return [host]
    return [host, LOOPBACK]


class Health:
    """Readiness of the xDS server. `built` says whether the first snapshot exists."""

    def __init__(self, built: Callable[[], bool], state: State | None, redis_url: str = "", revision: Callable[[], int] = lambda: 0):
        self.built, self.state, self.redis_url, self.revision = built, state, redis_url, revision

    async def check(self) -> tuple[bool, str]:
        if self.built():
            return True, f"serving the snapshot of revision {self.revision()}"
        if self.state is None:
            return False, "no state source"
        where = redact_url(self.redis_url) if self.redis_url else "Redis"
        try:
            await asyncio.wait_for(self.state.r.ping(), PING_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False, f"no first snapshot yet: Redis at {where} did not answer a PING within {PING_TIMEOUT_S:g}s"
        except (redis_exc.AuthenticationError, redis_exc.ResponseError) as e:  # before ConnectionError, its base
            return False, f"no first snapshot yet: Redis at {where} refuses: {type(e).__name__}: {e}"
        except (OSError, redis_exc.ConnectionError, redis_exc.TimeoutError) as e:
            return False, f"no first snapshot yet: Redis at {where} is unreachable: {type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - the reason is the answer
            return False, f"no first snapshot yet: Redis at {where}: {type(e).__name__}: {e}"
        return False, f"no first snapshot yet: Redis at {where} answers; building it"


def arrived_on_loopback(request: web.Request) -> bool:
    """Whether the connection was made to a loopback address of ours (its local end)."""
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return bool(sock) and is_loopback(str(sock[0]))


def make_app(health: Health, debug_config: Callable[[], object]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, reason = await health.check()
        return web.json_response({"status": "ok" if ok else "unavailable", "reason": reason}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), content_type="text/plain")

    async def config(request: web.Request) -> web.Response:
        # In the handler, not a path check: whatever spelling of the path reached it.
        if not arrived_on_loopback(request):
            return web.json_response({"error": "/debug/config answers on loopback only (kubectl port-forward, or a shell in the pod)"}, status=403)
        return web.json_response(debug_config())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/config", config)
    return app


async def serve(app: web.Application, debug_host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for host in bind_hosts(debug_host):
        await web.TCPSite(runner, host, port).start()
    return runner
