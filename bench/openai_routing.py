"""What routing /v1 requests by the JSON body's `model` costs at the gateway (issue 17, item 4).

The gateway's own REST listener (listeners.build_scoped_listener: the json_to_metadata filter behind its
/v1-only match_delegate, the key-setting Lua, on_demand, router), with one static route on the
scope key to a stand-in pod that is another listener of the same Envoy answering by itself
(direct_response): no Python anywhere, so what differs between the variants is the gateway's
filter chain alone. Same Envoy binary, same client: `wrk` (C, µs
latencies) on one keep-alive connection, closed loop, so each figure is one request's round trip
through the chain. Variants interleaved and repeated; medians over repeats are reported.

- `v1_body`: POST /v1/embeddings, model in the body (json_to_metadata lifts it, Lua keys on it).
- `v1_header`: the same request on a listener without json_to_metadata, model in mm-vmodel-id
  (what routing costs without reading the body).
- `v2_with` / `v2_without`: a v2 infer on a listener with / without the filter: the filter is
  skipped on /v2 paths, so these should agree.

    .venv/bin/python -m bench.openai_routing [--seconds 5] [--repeats 5]   (needs `wrk`: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from google.protobuf import json_format

import os
import re
import shutil
import subprocess

from bench.common import write
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import string_pb2
from meshserve_testing.devmesh import free_port, wait_until
from envoy.extensions.filters.http.router.v3 import router_pb2
from meshserve_xds import listeners, pb
from meshserve_xds import resources as r
from meshserve_xds import scoped
from meshserve_testing.xds_harness import envoy, http

MODEL = "m"


def listener(port: int, with_filter: bool) -> dict:
    lst = listeners.build_scoped_listener("meshserve_rest", "127.0.0.1", port, False)
    manager = hcm.HttpConnectionManager()
    lst.filter_chains[0].filters[0].typed_config.Unpack(manager)
    manager.ClearField("scoped_routes")
    route = rc.Route(match=rc.RouteMatch(prefix="/", headers=[rc.HeaderMatcher(name=r.KEY_HEADER, string_match=string_pb2.StringMatcher(exact=MODEL))]),
                     route=rc.RouteAction(cluster="pod"))
    manager.route_config.CopyFrom(route_pb2.RouteConfiguration(name="bench", virtual_hosts=[rc.VirtualHost(name="b", domains=["*"], routes=[route])]))
    if not with_filter:
        kept = [f for f in manager.http_filters if f.name != "meshserve.openai_model"]
        del manager.http_filters[:]
        manager.http_filters.extend(kept)
    lst.filter_chains[0].filters[0].typed_config.Pack(manager)
    lst.name = f"l{port}"
    return json_format.MessageToDict(lst)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, body: Path, headers: tuple[str, ...], seconds: int) -> dict[str, float]:
    """One connection, closed loop: p50/p90/p99 in ms, requests per second."""
    script = body.with_suffix(".lua")
    hdrs = "".join(f'wrk.headers["{h.split(":")[0]}"] = "{h.split(":", 1)[1].strip()}"\n' for h in headers)
    script.write_text(f'wrk.method = "POST"\n{hdrs}local f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    res: dict[str, float] = {}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)$", out, re.M)
        assert m, out
        res[f"p{pct}_ms"] = round(float(m.group(1)) * _UNITS[m.group(2)], 4)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = float(bad.group(1)) if bad else 0.0
    return res


def pod(port: int) -> tuple[dict, dict]:
    """The stand-in pod: a listener of the same Envoy that reads the request and answers it
    itself, and the cluster that reaches it. Both variants forward the whole body to it."""
    answer = rc.Route(match=rc.RouteMatch(prefix="/"), direct_response=rc.DirectResponseAction(status=200, body={"inline_string": '{"ok":true}'}))
    manager = hcm.HttpConnectionManager(
        stat_prefix="pod", route_config=route_pb2.RouteConfiguration(name="pod", virtual_hosts=[rc.VirtualHost(name="p", domains=["*"], routes=[answer])]),
        http_filters=[hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pb.pack_any(router_pb2.Router()))])
    lst = {"name": "pod", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": json_format.MessageToDict(pb.pack_any(manager))}]}]}
    cluster = {"name": "pod", "type": "STATIC", "connect_timeout": "1s",
               "load_assignment": {"cluster_name": "pod", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    return lst, cluster


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inputs", default="1,512", help="texts per request body (body size grows with it)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("this benchmark needs `wrk`: apt-get install wrk")
    p_with, p_without, p_pod = free_port(), free_port(), free_port()
    admin = 0  # Envoy binds any free admin port; the harness reads it back
    pod_listener, pod_cluster = pod(p_pod)
    boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [listener(p_with, True), listener(p_without, False), pod_listener], "clusters": [pod_cluster]}}
    results: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, envoy(json.dumps(boot), admin, concurrency=1):
        base_with, base_without = f"http://127.0.0.1:{p_with}", f"http://127.0.0.1:{p_without}"
        wait_until(lambda: http(f"{base_with}/v1/embeddings", data=json.dumps({"model": MODEL, "input": "x"}).encode())[0] == 200,
                   30, "the bench listener to route /v1 by body")
        for n in [int(x) for x in args.inputs.split(",")]:
            texts = [f"sentence number {i} about nothing in particular" for i in range(n)]
            v1 = Path(tmp) / f"v1-{n}.json"
            v1.write_text(json.dumps({"model": MODEL, "input": texts}))
            v2 = Path(tmp) / f"v2-{n}.json"
            v2.write_text(json.dumps({"inputs": [{"name": "text", "shape": [n], "datatype": "BYTES", "data": texts}]}))
            sizes[str(n)] = v1.stat().st_size
            variants = {
                f"v1_body/{n}": (f"{base_with}/v1/embeddings", v1, ("Content-Type: application/json",)),
                f"v1_header/{n}": (f"{base_without}/v1/embeddings", v1, ("Content-Type: application/json", f"mm-vmodel-id: {MODEL}")),
                f"v2_with/{n}": (f"{base_with}/v2/models/{MODEL}/infer", v2, ("Content-Type: application/json",)),
                f"v2_without/{n}": (f"{base_without}/v2/models/{MODEL}/infer", v2, ("Content-Type: application/json",)),
            }
            for url, body, headers in variants.values():  # warm-up, not recorded
                wrk(url, body, headers, 1)
            for _ in range(args.repeats):
                for name, (url, body, headers) in variants.items():
                    out = wrk(url, body, headers, args.seconds)
                    assert out["errors"] == 0, (name, out)
                    for k in ("p50_ms", "p90_ms", "p99_ms", "rps"):
                        results.setdefault(name, {}).setdefault(k, []).append(out[k])
    summary = {name: {k: round(statistics.median(v), 3) for k, v in r.items()} for name, r in results.items()}
    for name, s in summary.items():
        print(f"{name:16s} p50 {s['p50_ms'] * 1000:.0f} us  p90 {s['p90_ms'] * 1000:.0f} us  p99 {s['p99_ms'] * 1000:.0f} us  {s['rps']:.0f} rps")
    print(write("openai_routing", {"params": vars(args), "load_average": os.getloadavg(), "body_bytes": sizes, "results": summary, "raw": results}))


if __name__ == "__main__":
    main()
