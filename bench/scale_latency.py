"""Request latency through the gateway at 100,000 models against 10 (issue 3 target: p50
within 1.2x), side by side in one run.

Two meshes from `meshserve up`, production defaults (scoped routes, delta xDS): one with 10
registered tiny models, one with 100,000 registered and 1,000 loaded. The same client (`hey`,
rate-limited) sends to one loaded model of each, alternating rounds so machine noise hits
both alike.

    .venv/bin/python -m bench.scale_latency [--registered 100000] [--loaded 1000] [--rounds 4]

Writes bench/results/scale_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.common import hey, install_hey, write
from bench.density import BODY, count_loaded, register, request_loads, spec
from meshserve_testing import devmesh
from meshserve_testing.xds_harness import model_route_clusters


def _mesh(stack: ExitStack, tmp: Path, registered: int, loaded: int, timeout: float) -> devmesh.Mesh:
    cfg = tmp / f"config-{registered}"
    cfg.mkdir()
    m = stack.enter_context(devmesh.mesh(config_dir=cfg, pods=2, pod_capacity_bytes=8 << 30))
    d = m.data_dir / "pvc" / "density"
    d.mkdir(parents=True)
    (d / "tiny.txt").write_text("tiny")
    asyncio.run(register(m.redis_url, registered))
    asyncio.run(request_loads(m.redis_url, [spec(i).id for i in range(loaded)]))
    devmesh.wait_until(lambda: asyncio.run(count_loaded(m.redis_url)) >= loaded, timeout, f"{loaded} loaded")
    return m


def _warm(m: devmesh.Mesh, model_id: str) -> str:
    """The model's URL once the gateway routes it straight to a pod (not via the activator)."""
    def routed() -> bool:
        dump = json.loads(devmesh.http_get(f"{m.admin}/config_dump?resource=dynamic_route_configs")[1])
        return bool(model_route_clusters(dump, model_id))

    devmesh.wait_until(routed, 120, f"{model_id} routed at the gateway")
    return f"{m.rest}/v2/models/{model_id.split('__')[0]}/infer"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registered", type=int, default=100_000)
    ap.add_argument("--loaded", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rps", type=int, default=200)
    args = ap.parse_args()
    install_hey()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmpd = Path(tmp)
        small = _mesh(stack, tmpd, 10, 10, 120)
        big = _mesh(stack, tmpd, args.registered, args.loaded, 1200)
        body = tmpd / "body.json"
        body.write_bytes(BODY)
        model = spec(7).id  # loaded in both
        urls = {"10": _warm(small, model), str(args.registered): _warm(big, model)}
        rows = []
        for rnd in range(args.rounds):
            for size, url in (urls.items() if rnd % 2 == 0 else reversed(list(urls.items()))):
                r = hey(url, body, args.rps, args.seconds)
                r.update(models=size, round=rnd)
                rows.append(r)
                print(json.dumps(r), flush=True)
    summary = {}
    for size in urls:
        mine = [r for r in rows if r["models"] == size]
        summary[size] = {
            "p50_ms_median": round(statistics.median(r["p50_ms"] for r in mine), 3),
            "p99_ms_median": round(statistics.median(r["p99_ms"] for r in mine), 3),
            "errors": sum(r["errors"] for r in mine),
        }
    big_p50, small_p50 = summary[str(args.registered)]["p50_ms_median"], summary["10"]["p50_ms_median"]
    ratio = round(big_p50 / small_p50, 3) if small_p50 else None
    p = write("scale_latency", {
        "registered": args.registered, "loaded": args.loaded, "rps": args.rps, "seconds_per_round": args.seconds,
        "client": "hey (Go), 20 workers, rate-limited", "rows": rows, "summary": summary,
        "p50_ratio_100k_over_10": ratio, "target_p50_ratio_le_1_2": ratio is not None and ratio <= 1.2,
    })
    print(f"p50 ratio {ratio}; wrote {p}")


if __name__ == "__main__":
    main()
