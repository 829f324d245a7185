"""The loader's Prometheus metrics, served on the pod's loader metrics port. Labels are bounded
(no model ids): per-model detail lives in Redis and in `meshserve status`."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SIZE_BUCKETS = tuple(float(1 << n) for n in range(16, 36, 2))  # 64 KiB .. 16 GiB
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0)


class LoaderMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.model_size = Histogram(
            "meshserve_model_size_bytes", "Model sizes: predicted before load, measured after", ["kind"], buckets=SIZE_BUCKETS, registry=r
        )
        self.size_ratio = Histogram(
            "meshserve_model_size_ratio", "Measured size / predicted size, per load", buckets=RATIO_BUCKETS, registry=r
        )
        self.orders = Counter("meshserve_loader_orders", "Orders carried out", ["op", "result"], registry=r)
        self.load_seconds = Histogram(
            "meshserve_loader_load_seconds", "Pull + load time", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r
        )
        self.unload_seconds = Histogram(
            "meshserve_loader_unload_seconds", "Unload time, order received to runtime confirmed",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.reregistrations = Counter(
            "meshserve_loader_reregistrations", "Times the pod registered again after placement had withdrawn it", registry=r
        )
        self.runtime_restarts = Counter("meshserve_loader_runtime_restarts", "Runtime process restarts after it died", registry=r)
        self.capacity = Gauge("meshserve_loader_capacity_bytes", "Memory this pod offers placement for models", registry=r)
        self.used = Gauge("meshserve_loader_used_bytes", "Memory the loaded models take, as reported", registry=r)
        self.cache_bytes = Gauge("meshserve_loader_disk_cache_bytes", "Bytes in the disk cache of pulled models", registry=r)

    def observe_size(self, predicted: int, measured: int) -> None:
        self.model_size.labels("predicted").observe(predicted)
        if measured > 0:
            self.model_size.labels("measured").observe(measured)
            if predicted > 0:
                self.size_ratio.observe(measured / predicted)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner
