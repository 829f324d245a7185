"""Cold start into a full cache (issue 19): each new model's load must evict, and the evicted
copy's unload waits for its route withdrawal to reach the gateway. Two meshes side by side in
one run, the same churn setup as bench/churn.py (2 pods, the digits SVM, room `--per-pod`):
one whose unloads wait the whole `unload_grace_seconds` (0.5 s, as before), one whose unloads
end as soon as the gateway ACKed the withdrawal (the default). Requests alternate between
them, one at a time, after both caches were filled.

    .venv/bin/python -m bench.cold_evicting [--models 30]    # -> bench/results/cold_evicting.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench import churn
from bench.common import pct, write

SIDES = {"fixed grace": "false", "until the gateways ACKed": "true"}


def infer(base: str, name: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(f"{base}/v2/models/{name}/infer", data=churn.BODY, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    return code, (time.perf_counter() - t0) * 1000


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=30, help="cold requests per side")
    ap.add_argument("--per-pod", type=int, default=5)
    a = ap.parse_args(argv)
    fill = 2 * a.per_pod
    with ExitStack() as stack:
        meshes = {}
        for side, wait in SIDES.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ms-cold-evict-")))
            meshes[side] = stack.enter_context(churn.churn_mesh(tmp, fill + a.models, a.per_pod, unload_waits_for_gateways=wait))
        for side, (m, names) in meshes.items():
            assert all(infer(m.rest, n)[0] == 200 for n in names[:fill]), f"{side}: filling the cache"
        time.sleep(6.0)  # the fill's copies leave the busy window: each cold load evicts an idle one
        samples: dict[str, list[float]] = {s: [] for s in SIDES}
        errors = {s: 0 for s in SIDES}
        for i in range(a.models):
            order = list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]
            for side in order:
                m, names = meshes[side]
                code, ms = infer(m.rest, names[fill + i])
                samples[side].append(ms)
                errors[side] += code != 200
    out = {s: {"p50_ms": round(pct(v, 50), 1), "p99_ms": round(pct(v, 99), 1), "mean_ms": round(statistics.mean(v), 1),
               "errors": errors[s], "samples_ms": [round(x, 1) for x in v]} for s, v in samples.items()}
    before, after = out["fixed grace"]["p50_ms"], out["until the gateways ACKed"]["p50_ms"]
    doc = {"models": a.models, "per_pod": a.per_pod, "sides": out, "p50_ratio_after_over_before": round(after / before, 3)}
    for s, r in out.items():
        print(f"{s}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}")
    print(f"ratio {doc['p50_ratio_after_over_before']}")
    print(write("cold_evicting", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
