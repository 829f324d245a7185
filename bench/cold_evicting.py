"""Cold start into a full cache (issue 19): each new model's load must evict, and the evicted
copy's unload waits for its route withdrawal to reach the gateway. Two meshes side by side in
one run, the same churn setup as bench/churn.py (2 pods, the digits SVM, room `--per-pod`),
each side's placement tuned as SIDES says. Requests alternate between them, one at a time,
after both caches were filled.

Sides (`--sides`):
- `reserve` (default): no unload reserve (the load waits for its victim's unload, which ends
  when the gateway ACKed the route withdrawal) against ModelMesh's unload reserve (the default
  now: the load starts at once, the unload uses the reserve);
- `grace`: unloads that wait the whole `unload_grace_seconds` (0.5 s) against unloads that end
  at the gateway's ACK (the comparison of the earlier run), both without a reserve.

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

SIDES: dict[str, dict[str, dict[str, object]]] = {
    "reserve": {"no unload reserve": {"unload_reserve_fraction": 0.0}, "ModelMesh's unload reserve": {}},
    "grace": {"fixed grace": {"unload_waits_for_gateways": "false", "unload_reserve_fraction": 0.0},
              "until the gateways ACKed": {"unload_waits_for_gateways": "true", "unload_reserve_fraction": 0.0}},
}


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
    ap.add_argument("--sides", choices=sorted(SIDES), default="reserve")
    a = ap.parse_args(argv)
    sides = SIDES[a.sides]
    fill = 2 * a.per_pod
    with ExitStack() as stack:
        meshes = {}
        for side, tuning in sides.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ms-cold-evict-")))
            meshes[side] = stack.enter_context(churn.churn_mesh(tmp, fill + a.models, a.per_pod, **tuning))
        for side, (m, names) in meshes.items():
            assert all(infer(m.rest, n)[0] == 200 for n in names[:fill]), f"{side}: filling the cache"
        time.sleep(6.0)  # the fill's copies leave the busy window: each cold load evicts an idle one
        samples: dict[str, list[float]] = {s: [] for s in sides}
        errors = {s: 0 for s in sides}
        for i in range(a.models):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for side in order:
                m, names = meshes[side]
                code, ms = infer(m.rest, names[fill + i])
                samples[side].append(ms)
                errors[side] += code != 200
    out = {s: {"p50_ms": round(pct(v, 50), 1), "p99_ms": round(pct(v, 99), 1), "mean_ms": round(statistics.mean(v), 1),
               "errors": errors[s], "samples_ms": [round(x, 1) for x in v]} for s, v in samples.items()}
    before, after = (out[s]["p50_ms"] for s in sides)
    doc = {"models": a.models, "per_pod": a.per_pod, "compared": a.sides, "sides": out,
           "p50_ratio_after_over_before": round(after / before, 3)}
    for s, r in out.items():
        print(f"{s}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}")
    print(f"ratio {doc['p50_ratio_after_over_before']}")
    print(write("cold_evicting" if a.sides == "reserve" else f"cold_evicting_{a.sides}", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
