"""Issue 7: a rolling restart of every runtime pod, under load, fails no request.

Each pod is told to stop (SIGTERM, what Kubernetes sends after a preStop hook) in turn. Its
loader drains it: the pod is marked draining, placement loads its copies elsewhere and then
orders them unloaded here, which withdraws their routes; the runtime keeps serving until the
gateway stops sending requests (the unload is deferred while draining), then the pod exits.
`meshserve up` restarts it, as a StatefulSet would, and the next pod goes once it is Ready
again and the model is back at two copies. Results go to bench/results/faults.json
("rolling_restart") for docs/reliability.md.

Kind: e2e. Real Envoy, Valkey, placement, loader agents and built-in runtimes (`meshserve up`,
three pods, the example model at minCopies 2); real signals; every wait bounded.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from e2e.faults import pods
from e2e.faults.test_faults import infer_url, record
from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e
PODS = 3
RPS = 50
# As the Kubernetes manifests set it (istio/): a move is a load elsewhere plus a route push.
# `meshserve up` keeps the 1 s default so that Ctrl-C stays quick.
DRAIN_TIMEOUT_S = float(os.environ.get("MESHSERVE_ROLLING_DRAIN_TIMEOUT_SECONDS", "10"))


@pytest.mark.parametrize("layout", ["scoped", "matcher"])
def test_rolling_restart_of_every_pod_under_load_fails_no_request(fixtures: Path, tmp_path: Path, layout: str) -> None:
    body = (fixtures / "mnist-request-proto-json.json").read_bytes()
    with devmesh.mesh(config_dir=pods.min_copies_config(tmp_path), pods=PODS, scale_up_rps=100000,
                      drain_timeout_seconds=DRAIN_TIMEOUT_S, xds_layout=layout) as m:
        r = redis.Redis.from_url(m.redis_url)
        try:
            mid = pods.model_id(r)

            def settled() -> bool:
                held = pods.loaded(r, mid)
                return len(held) == 2 and pods.gateway_pods(m, mid) == held

            devmesh.wait_until(settled, 120, "two copies loaded and routed")
            steps = []
            with pods.TimedLoad(infer_url(m), body, rps=RPS, max_seconds=300) as load:
                time.sleep(2)
                for i in range(PODS):
                    pod, name = f"pod-{i}", f"loader-{i}"
                    before = sorted(pods.loaded(r, mid))
                    failed_before = load.failed
                    wall, t0 = time.time(), time.monotonic()
                    old = m.signal(name, signal.SIGTERM)
                    t: dict[str, float] = {}
                    deadline = t0 + DRAIN_TIMEOUT_S + 60
                    while time.monotonic() < deadline and len(t) < 3:
                        now = time.monotonic() - t0
                        if "placement_dropped" not in t and pod not in pods.copies(r, mid):
                            t["placement_dropped"] = now
                        if "gateway_withdrawn" not in t and pod not in pods.gateway_pods(m, mid):
                            t["gateway_withdrawn"] = now
                        if "exited" not in t and not pods.alive(old):
                            t["exited"] = now
                        time.sleep(0.02)
                    m.wait_restarted(name, old, 60)
                    devmesh.wait_until(lambda: pods.registered(r, pod, wall) and settled(), 90, f"{pod} Ready again, two copies routed")
                    t["ready_again"] = time.monotonic() - t0
                    steps.append({"pod": pod, "copies_before": before, "copies_after": sorted(pods.loaded(r, mid)),
                                  "failed": load.failed - failed_before, **{f"{k}_s": round(v, 2) for k, v in t.items()}})
                    print(f"\n  {pod}: " + ", ".join(f"{k} {v}" for k, v in steps[-1].items() if k != "pod"))
                time.sleep(2)
        finally:
            r.close()
        log = m.log()
    drained = [s["pod"] for s in steps if f"drained pod {s['pod']}:" in log]
    record("rolling_restart" if layout == "scoped" else f"rolling_restart[{layout}]", layout=layout, sent=load.sent, failed=load.failed, failures=load.failures[:5], pods=PODS, rps=RPS,
           drain_timeout_seconds=DRAIN_TIMEOUT_S, drained_quietly=drained, steps=steps)
    print(f"\nrolling restart of {PODS} pods ({layout} layout): {load.sent} sent, {load.failed} failed")
    assert len(steps) == PODS
    assert load.sent > 300
    assert load.failed == 0, load.failures
    # A pod holding a copy when told to stop had it moved (each of the three does, as the copies
    # rotate), and every drain ended on a quiet runtime, not on its timeout.
    moved = [s["pod"] for s in steps if s["pod"] in s["copies_before"] and s["pod"] not in s["copies_after"]]
    assert len(moved) >= PODS - 1, steps
    assert drained == [s["pod"] for s in steps], log[-4000:]
    assert "timed out: copies left" not in log
