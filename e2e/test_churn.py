"""Issue 19: under churn the cache serves every request, more slowly when it must.

Kind: e2e. `meshserve up` (real Valkey, Envoy gateway, xDS, placement, activator, loaders and
built-in runtimes): 24 registered copies of the example model, 2 pods with room for 3 each,
a Zipf(1.0) sequence of 150 requests at 10/s from up to 16 threads, through the gateway. Every
answer must be a 200: no 503 because the room is booked by loading copies (the request waits
for it), none because busy copies hold it (they are evicted as a last resort), and no 404 from a
pod that has just unloaded the model (the unload waits for the route withdrawal). And the tail
must stay bounded: p99 under 10 s. bench/churn.py runs the same loop at the issue's size.

Before busy copies could be evicted, the same loop (bench.churn with these numbers) answered
all 150 with 200 but p99 22.4 s: new models waited for copies to leave the 5 s busy window,
and all 22 models requested are used within every window. After: p99 1.9 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import churn

pytestmark = pytest.mark.e2e

MODELS, PER_POD, REQUESTS, RPS, P99_BOUND_S = 24, 3, 150, 10.0, 10.0


def test_churn_answers_every_request_with_200(tmp_path: Path) -> None:
    with churn.churn_mesh(tmp_path, MODELS, PER_POD) as (mesh, names):
        seq = churn.zipf_sequence(names, REQUESTS)
        t0 = time.time()
        # Each request is bounded by the cold-start timeout (60 s) and the loop by its count.
        res = churn.run(mesh.rest, seq, RPS, threads=16, timeout=70)
        counts = churn.placement_counts(mesh.redis_url, t0)
    assert sum(res.statuses.values()) == REQUESTS
    assert res.bad() == 0, f"non-200 answers {dict(res.statuses)}: {res.samples}"
    p99 = churn.pct([dt for _, dt in res.latencies], 99)
    assert p99 < P99_BOUND_S, f"p99 {p99:.1f}s: new models starve behind busy copies"
    # It was churn: more distinct models than fit, so placement evicted to make room.
    assert len(set(seq)) > 2 * PER_POD and counts.get("unloads", 0) > 0, counts


def test_a_cold_request_waits_while_every_loader_is_late(tmp_path: Path) -> None:
    """Issue 19, the side-by-side run with Ray Serve on a loaded 2-core machine: 114 and 11 ×
    503 "no runtime pod can hold it" for models that fit. Starved of CPU, every loader's
    heartbeat was late at once and the decision refused every pod as unhealthy, for good.
    Here both loaders are frozen (SIGSTOP) past the heartbeat limit; their runtimes still
    answer, so the pods stay registered (stalled). A cold request then must wait for them,
    and get its 200 once they are back."""
    import os
    import signal
    import threading

    with churn.churn_mesh(tmp_path, 4, PER_POD) as (mesh, names):
        pids = [mesh.pids()[f"loader-{i}"] for i in (0, 1)]
        out: list[churn.Result] = []
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)  # past heartbeat_misses x heartbeat_seconds (2 s), short of the stall grace
            t = threading.Thread(target=lambda: out.append(churn.run(mesh.rest, [names[0]], 1.0, threads=1, timeout=70)))
            t.start()
            time.sleep(2.0)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        t.join(70)
    assert out and out[0].bad() == 0 and sum(out[0].statuses.values()) == 1, (out[0].statuses, out[0].samples) if out else "no answer"
