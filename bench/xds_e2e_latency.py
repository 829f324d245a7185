"""From a placement change written in Redis to the gateway having applied it (issue 3 target:
p99 <= 100 ms with 20,000 models loaded), on the production path.

Real Valkey, the production RedisSource / cache / ADS server (in-process), a real Envoy with
the production bootstrap, four stand-in pods. Each change moves one model to another pod with
`State.commit`; "applied" is observed on Envoy's data plane: a request for that model reaching
the new pod.

    .venv/bin/python -m bench.xds_e2e_latency --models 1000,20000 --changes 5
    .venv/bin/python -m bench.xds_e2e_latency --models 20000 --registered 100000 --changes 100 --layout scoped

Writes bench/results/xds_e2e_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.xds_routing import Client
from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy
from meshserve_xds.source import RedisSource

RESULTS = Path(__file__).resolve().parent / "results" / "xds_e2e_latency.json"
PODS = 4


def model_id(i: int) -> str:
    return f"m{i}__isvc-{i:010x}"


async def seed(url: str, n: int, pods: list[Pod], registered: int = 0) -> None:
    """n loaded models; `registered` (if larger) models registered in all, the rest cold."""
    s = st.State.from_url(url)
    try:
        ops: list[list[Any]] = [["HSET", st.PODS, p.id, p.to_json()] for p in pods]
        for i in range(max(n, registered)):
            if i < n:
                ops.append(["HSET", st.PLACEMENTS, model_id(i), copies_to_json({pods[i % PODS].id: Copy(CopyState.LOADED)})])
            ops.append(["HSET", st.ALIASES, f"m{i}", model_id(i)])
            ops.append(["HSET", st.MODELS, model_id(i), ModelSpec(model_id(i), f"m{i}", "sklearn", {}).to_json()])
        await s.commit(ops, [(st.KIND_ALL, "")])
    finally:
        await s.close()


def run(n: int, changes: int, delta: bool, layout: str = "matcher", registered: int = 0, warmup: int = 3) -> dict[str, Any]:
    ups = [Upstream(f"pod-{k}") for k in range(PODS)]
    act = Upstream("activator")
    for u in [*ups, act]:
        u.__enter__()
    try:
        with devmesh.valkey() as v:
            pods = [Pod(u.name, "127.0.0.1", u.port, u.port, 1 << 30) for u in ups]
            asyncio.run(seed(v.url, n, pods, registered))
            rest, grpc_port = devmesh.free_port(), devmesh.free_port()
            admin = 0  # Envoy binds any free admin port; the harness reads it back
            settings = Settings(redis_url=v.url, gateway_rest_port=rest, gateway_grpc_port=grpc_port,
                                activator_rest_port=act.port, activator_grpc_port=act.port)
            ads = AdsThread().start()
            state = ads.call(_state(v.url))
            try:
                assert ads.cache is not None
                src = RedisSource(settings, state, ads.cache, layout=layout)
                task = asyncio.run_coroutine_threadsafe(src.run(), ads.loop)
                with envoy(gateway_bootstrap("bench-e2e", "127.0.0.1", ads.port, admin, delta=delta), admin) as gw:
                    cl = Client(rest)
                    if cl.wait_for(f"m{n - 1}", {}, f"pod-{(n - 1) % PODS}", 300) is None:
                        return {"models": n, "delta": delta, "layout": layout, "error": "initial config not applied in 300 s"}
                    writer = st.State.from_url(v.url)
                    loop = asyncio.new_event_loop()
                    lat: list[float | None] = []
                    in_cache: list[float] = []
                    try:
                        for k in range(warmup + changes):
                            i = (k * 7919 + 1) % n
                            new = pods[(i + 1 + k) % PODS].id
                            if new == pods[i % PODS].id:
                                new = pods[(i + 2) % PODS].id
                            rev = loop.run_until_complete(writer.commit(
                                [["HSET", st.PLACEMENTS, model_id(i), copies_to_json({new: Copy(CopyState.LOADED)})]],
                                [(st.KIND_PLACEMENT, model_id(i))]))
                            t0 = time.monotonic()
                            devmesh.wait_until(lambda: src.rev >= rev, 120, "source applied", interval=0.0005)
                            in_cache.append(round((time.monotonic() - t0) * 1e3, 1))
                            done = cl.wait_for(f"m{i}", {}, new, 120)
                            lat.append(round((done - t0) * 1e3, 1) if done else None)
                    finally:
                        loop.run_until_complete(writer.close())
                        loop.close()
                    warm, lat = lat[:warmup], lat[warmup:]
                    in_cache = in_cache[warmup:]
                    ok = sorted(x for x in lat if x is not None)
                    rss = round(gw.rss_bytes() / 2**20, 1)
                task.cancel()
                return {"models": n, "delta": delta, "layout": layout, "registered": max(n, registered), "warmup_changes_ms": warm, "changes_ms": lat, "in_cache_ms": in_cache, "p50_ms": statistics.median(ok) if ok else None,
                        "p99_ms": ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else None,
                        "max_ms": ok[-1] if ok else None, "envoy_rss_mib": rss}
            finally:
                ads.call(state.close())
                ads.stop()
    finally:
        for u in [*ups, act]:
            u.__exit__()


async def _state(url: str) -> st.State:
    return st.State.from_url(url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1000,20000")
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--delta", action="store_true")
    ap.add_argument("--layout", default="matcher", choices=["matcher", "scoped"])
    ap.add_argument("--registered", type=int, default=0, help="models registered in all (the rest cold)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed changes first: Envoy may still be applying the initial config")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for n in (int(x) for x in args.models.split(",")):
        res = run(n, args.changes, args.delta or args.layout == "scoped", args.layout, args.registered, args.warmup)
        res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(json.dumps(res), flush=True)
        results[f"{n}/{max(n, args.registered)}/{args.layout}/{'delta' if res['delta'] else 'sotw'}"] = res
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
