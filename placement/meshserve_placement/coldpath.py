"""What the activator's fronts (REST and OpenAI in activator.py and openai_routes.py, gRPC in
activator_grpc.py) share: the cold-path metrics, the load-failure error and the headers a
forward drops. Its own module so that the fronts import it, not each other."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram

log = logging.getLogger("meshserve.activator")

M_COLD = Counter("meshserve_activator_requests", "Requests that reached the activator (cold path)", ["protocol", "code"])
M_COLD_WAIT = Histogram(
    "meshserve_cache_miss_seconds", "Time a request for an unloaded model waited for its load",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class LoadFailed(Exception):
    """A model that cannot be served now: `status` is the HTTP code the client gets (404, 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
