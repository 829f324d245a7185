"""Placement's own knobs, overridable like every setting by MESHSERVE_<NAME> environment
variables. Kept beside the placement code (not in meshserve/settings.py) because nothing else
reads them; defaults and the numbers behind them are in docs/design/placement.md."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from meshserve.settings import coerce_env


@dataclass
class Tuning:
    # A model used (by the runtimes' counters or the activator) within this window counts as
    # having requests in flight and is never evicted or unloaded. The runtimes report each
    # heartbeat, so the window must cover a heartbeat plus a slow request.
    busy_window_seconds: float = 5.0
    # How often the leader reads the runtimes' request counters (GET /v2/meshserve/stats).
    rate_poll_seconds: float = 2.0
    # Another copy when a model's rate per copy exceeds this (ModelMesh: 2000 requests/min).
    scale_up_rps: float = 33.0
    # One copy fewer when the rate would still be under half the threshold with one copy
    # less, and no copy was added for this long.
    scale_down_after_seconds: float = 30.0
    # Unload a model's last copy after this long unused (0: never; eviction still applies).
    # Pinned models and models with minCopies are never unloaded this way.
    idle_unload_seconds: float = 0.0
    # A model used within this long whose every copy is on a paused pod (placement's Pod
    # liveness) gets a copy on a pod that answers, so its requests stop waiting for the pause to
    # end; the extra copy goes by the usual scale-down once the pod is back. 0: never.
    paused_cover_seconds: float = 60.0
    # How often the leader reconciles copies (scale, minimums, idle, draining pods).
    maintain_seconds: float = 1.0
    # Eviction value horizon (see view.ClusterView.eviction_key); 0 gives plain global LRU.
    eviction_horizon_seconds: float = 300.0
    # Attempts at loading one model (each on a pod not tried yet) before giving up.
    max_load_attempts: int = 3
    # A load may be sent while the copies evicted for it are still in their unload grace
    # (unload_grace_seconds, the gateways withdrawing their routes), as long as the pod then
    # holds at most capacity x (1 + this). 0: a pod never holds more than its capacity, and a
    # load that evicts waits for its unloads (at least the grace; under churn most of a miss's
    # time, docs/benchmarks.md "Churn"). Booking is unchanged: decisions never book over capacity.
    unload_overlap_fraction: float = 0.0
    # The part of each pod's capacity placement keeps for copies being unloaded (their grace, the
    # gateways withdrawing the routes), so a load that evicts starts at once and the pod still
    # never holds more than its capacity. Below 0: ModelMesh's unload buffer (1% to 10% of the
    # capacity, view.unload_reserve); 0: none, a load that evicts waits for its unloads.
    unload_reserve_fraction: float = -1.0
    # Loads that requests wait for, ordered to a pod beyond its loading slots (max_loading):
    # the loader starts each as one of its slots frees, so a slot does not idle for the round
    # trip from a load's result through the leader to the next order (dispatch.plan_dispatch).
    # Background loads never go ahead, so no later request waits behind them. 0: an order per free slot.
    order_lookahead: int = 2

    @classmethod
    def from_env(cls, **overrides: object) -> "Tuning":
        t = cls()
        for f in dataclasses.fields(cls):
            var = f"MESHSERVE_{f.name.upper()}"
            env = os.environ.get(var)
            if env is not None:
                setattr(t, f.name, coerce_env(f.type, env, var))
        for k, v in overrides.items():
            setattr(t, k, v)
        return t
