"""Churn (issue 19): many registered copies of the example model, pods with room for a few
dozen, Zipf(1.0) requests at a fixed rate for a bounded time, all through the gateway. An LRU
cache must answer every request with a 200, more slowly when it must load (and evict) first.

    .venv/bin/python -m bench.churn [--models 1031] [--zipf-over 1000] [--per-pod 30] [--rps 40] [--seconds 90]

Reports the answers by status (with a sample of each non-200 body), latency p50/p99 (all, and
200s only), the cold loads and evictions placement ordered, to bench/results/churn.json.
e2e/test_churn.py runs the same loop, small, in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bench import hops
from bench.common import pct, write
from meshserve_placement.view import unload_reserve
from meshserve_testing import devmesh

# A row of scikit-learn's digits set (the example model predicts 8 for it): the request body of
# ../shared/fixtures/mnist-request-v2-rest.json, inlined so the benchmark needs no fixtures.
DIGIT = [0.0, 0.0, 1.0, 11.0, 14.0, 15.0, 3.0, 0.0, 0.0, 1.0, 13.0, 16.0, 12.0, 16.0, 8.0, 0.0, 0.0, 8.0, 16.0, 4.0, 6.0, 16.0,
         5.0, 0.0, 0.0, 5.0, 15.0, 11.0, 13.0, 14.0, 0.0, 0.0, 0.0, 0.0, 2.0, 12.0, 16.0, 13.0, 0.0, 0.0, 0.0, 0.0, 0.0, 13.0, 16.0,
         16.0, 6.0, 0.0, 0.0, 0.0, 0.0, 16.0, 16.0, 16.0, 7.0, 0.0, 0.0, 0.0, 0.0, 11.0, 13.0, 12.0, 1.0, 0.0]
BODY = json.dumps({"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": DIGIT}]}).encode()

# What placement books per copy (each copy's size hint, set after registration): the pods'
# capacity is "room for N" of these. A load then books the larger of the hint and the size the
# runtime reports, which for the digits SVM is 542,483 bytes every time (its file is 538,779
# bytes; measured 2026-12-02). The hint is just above it, so "room for 30" holds 30. (It was
# 160 KiB, from the RSS deltas the runtime reported before sizes were made deterministic: with
# loads reporting 542,483 that was room for 9, not 30.)
MODEL_BYTES = 530 << 10


def config(d: Path, n: int) -> list[str]:
    """A mesh-config with `n` InferenceServices, all the example model's file."""
    names = [f"digits-{i:04d}" for i in range(n)]
    d.mkdir(parents=True, exist_ok=True)
    docs = [devmesh.inference_service(n, "sklearn", devmesh.pvc_storage("my-models-pvc", "mnist-svm.joblib")) for n in names]
    (d / "churn.yaml").write_text("---\n".join(docs))
    return names


async def _size_hints(url: str, size: int, pinned: tuple[str, ...] = ()) -> None:
    # The registry has no size annotation: a model never loaded books 64 MiB until its first
    # load measures it, more than these small pods hold. Re-register with a hint instead.
    from meshserve.store import keys
    from meshserve.store import State
    from meshserve.model import ModelSpec

    state = State.from_url(url)
    try:
        specs = [ModelSpec.from_json(v) for v in (await state.r.hgetall(keys.MODELS)).values()]
        for spec in specs:
            spec.size_hint = size
            spec.pinned = spec.pinned or spec.alias in pinned or spec.id in pinned
        await state.register_models(specs)
    finally:
        await state.close()


def capacity_for(need: int, extra: dict[str, object], max_loading: int = 2) -> int:
    """A pod capacity whose bookable part holds `need` bytes: placement keeps an unload reserve
    aside (view.unload_reserve), so "room for N" holds N models, as it did before the reserve."""
    fraction = float(str(extra.get("unload_reserve_fraction", -1.0)))
    cap = need
    while cap - unload_reserve(cap, max_loading, fraction) < need:
        cap = need + unload_reserve(cap, max_loading, fraction) + 1
    return cap


@contextmanager
def churn_mesh(tmp: Path, models: int, per_pod: int, pods: int = 2, pinned: tuple[str, ...] = (), **extra: object) -> Iterator[tuple[devmesh.Mesh, list[str]]]:
    names = config(tmp / "config", models)
    with devmesh.mesh(config_dir=tmp / "config", pods=pods, pod_capacity_bytes=capacity_for(per_pod * MODEL_BYTES, extra), **extra) as m:
        asyncio.run(_size_hints(m.redis_url, MODEL_BYTES, pinned))
        yield m, names


@dataclass
class Result:
    statuses: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    samples: dict[str, str] = field(default_factory=dict)  # status -> a body
    latencies: list[tuple[int, float]] = field(default_factory=list)  # (status, seconds)

    def bad(self) -> int:
        return sum(n for code, n in self.statuses.items() if code != 200)


def zipf_sequence(names: list[str], n: int, s: float = 1.0, seed: int = 19) -> list[str]:
    """`n` names drawn Zipf(s) over `names` (rank 1 most popular), ranks shuffled by the seed."""
    rng = random.Random(seed)
    ranked = list(names)
    rng.shuffle(ranked)
    weights = [1.0 / (k ** s) for k in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=n)


def run(base: str, sequence: list[str], rps: float, threads: int = 256, timeout: float = 120.0, name_header: str = "") -> Result:
    """Send `sequence` at `rps` (open loop: a slow answer does not slow the sender, up to
    `threads` outstanding), one request per name, and collect every answer. Latency counts
    from the time a request was due, so waiting for a free thread is part of it. `name_header`:
    also send the name in this header (Ray Serve's multiplexing reads the model id there)."""
    res = Result()
    lock = threading.Lock()

    def one(name: str, t0: float) -> None:
        try:
            req = urllib.request.Request(f"{base}/v2/models/{name}/infer", data=BODY, method="POST",
                                         headers={name_header: name} if name_header else {})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                code, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        except Exception as e:  # noqa: BLE001 - a reset or time-out is an answer to count too
            code, body = 0, f"{type(e).__name__}: {e}".encode()
        dt = time.perf_counter() - t0
        with lock:
            res.statuses[code] += 1
            res.latencies.append((code, dt))
            if code != 200:
                res.samples.setdefault(str(code), body[:300].decode(errors="replace"))

    with ThreadPoolExecutor(threads) as pool:
        start = time.monotonic()
        for i, name in enumerate(sequence):
            due = start + i / rps
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, name, time.perf_counter() - max(0.0, time.monotonic() - due))
    return res


class Probe:
    """The hot path under churn (issue 19: "the hot path must not queue behind loads"): one
    pinned, loaded model requested at a steady rate, one request at a time, through the
    gateway (Envoy routes it straight to its pod, no activator). Its latency while the pods
    load and unload other models, against the same probe with no churn, says whether loads
    (which run in their own thread in the runtime) hold up inference."""

    def __init__(self, base: str, name: str, rps: float = 10.0):
        self.url, self.period = f"{base}/v2/models/{name}/infer", 1.0 / rps
        self.ms: list[float] = []
        self.bad = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _loop(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                req = urllib.request.Request(self.url, data=BODY, method="POST")
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                    ok = r.status == 200
            except Exception:  # noqa: BLE001 - counted
                ok = False
            if ok:
                self.ms.append((time.perf_counter() - t0) * 1000)
            else:
                self.bad += 1
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def run_for(self, seconds: float) -> dict[str, object]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def start(self) -> None:
        self.ms, self.bad = [], 0
        self._stop.clear()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def stop(self) -> dict[str, object]:
        self._stop.set()
        if self._t is not None:
            self._t.join()
        return {"requests": len(self.ms) + self.bad, "non_200": self.bad,
                "p50_ms": round(pct(self.ms, 50), 2), "p99_ms": round(pct(self.ms, 99), 2), "max_ms": round(max(self.ms, default=0), 2)}


def placement_counts(url: str, since: float) -> dict[str, int]:
    """Loads and unloads the loaders reported (ms:events) since `since`."""
    import redis

    from meshserve.store import keys

    r = redis.Redis.from_url(url)
    try:
        out: Counter = Counter()  # type: ignore[type-arg]
        for _, f in r.xrange(keys.EVENTS, min=f"{int(since * 1000)}-0"):
            op = f.get(b"op", b"").decode()
            if op in ("load", "unload"):
                out[f"{op}s" + ("" if f.get(b"ok") == b"1" else "_failed")] += 1
        return dict(out)
    finally:
        r.close()


def loaded_now(url: str) -> dict[str, object]:
    """Copies loaded at the end and the bytes they book (the sizes the runtime measured)."""
    import redis

    from meshserve.store import keys
    from meshserve.model import CopyState, copies_from_json

    r = redis.Redis.from_url(url)
    try:
        sizes = [c.size for v in r.hvals(keys.PLACEMENTS) for c in copies_from_json(v).values() if c.state == CopyState.LOADED]
    finally:
        r.close()
    return {"copies": len(sizes), "mean_bytes": int(sum(sizes) / len(sizes)) if sizes else 0}


def summary(res: Result) -> dict[str, object]:
    all_ms = [dt * 1000 for _, dt in res.latencies]
    ok_ms = [dt * 1000 for code, dt in res.latencies if code == 200]
    return {
        "requests": len(res.latencies),
        "by_status": {str(k): v for k, v in sorted(res.statuses.items())},
        "non_200_samples": res.samples,
        "latency_ms": {"p50": round(pct(all_ms, 50), 1), "p99": round(pct(all_ms, 99), 1), "max": round(max(all_ms, default=0), 1)},
        "latency_200_ms": {"p50": round(pct(ok_ms, 50), 1), "p99": round(pct(ok_ms, 99), 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=1031, help="registered copies of the example model")
    ap.add_argument("--zipf-over", type=int, default=1000, help="how many of them the requests are drawn from")
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--per-pod", type=int, default=30, help="each pod's capacity, in copies")
    ap.add_argument("--rps", type=float, default=40.0)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--probe-seconds", type=float, default=15.0, help="hot-path probe alone, before the churn (0: no probe)")
    ap.add_argument("--unload-overlap", type=float, default=0.0, help="placement's unload_overlap_fraction (0: loads wait for their unloads)")
    ap.add_argument("--unload-reserve", type=float, default=-1.0,
                    help="placement's unload_reserve_fraction (below 0: ModelMesh's unload buffer, the default; 0: none)")
    ap.add_argument("--out", default="churn", help="the result's name under bench/results/")
    ap.add_argument("--hops", action="store_true", help="time each hop of the cold requests from the trace spans (bench/hops.py)")
    args = ap.parse_args()
    collector = hops.Collector() if args.hops else None
    probe_name = f"digits-{args.models - 1:04d}"  # outside the Zipf set when zipf_over < models
    pinned = (probe_name,) if args.probe_seconds and args.zipf_over < args.models else ()
    extra: dict[str, object] = {"unload_overlap_fraction": args.unload_overlap} if args.unload_overlap else {}
    if args.unload_reserve >= 0:
        extra["unload_reserve_fraction"] = args.unload_reserve
    with tempfile.TemporaryDirectory(prefix="ms-churn-") as tmp, churn_mesh(Path(tmp), args.models, args.per_pod, args.pods, pinned, **extra) as (mesh, names):
        seq = zipf_sequence(names[: args.zipf_over], int(args.rps * args.seconds), args.zipf_s)
        hot: dict[str, object] = {}
        probe = Probe(mesh.rest, probe_name) if pinned else None
        if probe is not None:
            urllib.request.urlopen(urllib.request.Request(probe.url, data=BODY, method="POST"), timeout=120).read()  # load it
            time.sleep(2.0)  # the route reaches the gateway
            hot["alone"] = probe.run_for(args.probe_seconds)
            probe.start()
        t0 = time.time()
        res = run(mesh.rest, seq, args.rps)
        if probe is not None:
            hot["under_churn"] = probe.stop()
        doc = {
            "registered": args.models, "zipf_over": args.zipf_over, "zipf_s": args.zipf_s, "pods": args.pods,
            "capacity_copies_per_pod": args.per_pod, "copy_bytes_booked": MODEL_BYTES, "rps": args.rps,
            "seconds": args.seconds, "distinct_models_requested": len(set(seq)), "unload_overlap_fraction": args.unload_overlap,
            "unload_reserve_fraction": args.unload_reserve,
            **summary(res), "placement": placement_counts(mesh.redis_url, t0), "loaded_at_end": loaded_now(mesh.redis_url),
            "wall_seconds": round(time.time() - t0, 1), "hot_path_probe": hot,
        }
        if collector is not None:
            time.sleep(1.5)  # the processes export every 200 ms
            spans = collector.spans
            doc["cold_hops_ms"] = hops.hops(spans, set(names))
            doc["slowest_cold_hops_ms"] = hops.hops(spans, set(names), slowest=0.05)
            collector.close()
    print(json.dumps(doc, indent=2))
    print(write(args.out, doc))


if __name__ == "__main__":
    main()
