"""Per-hop timing of the cold path from the components' own trace spans (issue 19 §4).

Every process of the mesh exports its spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
is set (meshserve/tracing.py). `Collector` is a tiny OTLP/HTTP receiver in the benchmark's own
process: start it before the mesh (it sets the variables the mesh's processes inherit), then
`hops()` splits each cold request's trace into the hops below. All processes run on one machine,
so their clocks agree.

    activator.request -> activator.hold (resolve the name)
    hold -> placement.decide           (activator reads copies, asks; leader wakes, refreshes)
    placement.decide                   (policy, commit of copy + order)
    decide -> loader.pull              (order reaches the loader)
    loader.pull, loader.load           (files; the runtime's load)
    load -> placement.loaded           (result event reaches the leader)
    placement.loaded                   (leader commits the copy LOADED)
    loaded -> hold end                 (activator wakes, reads the copy and pod)
    hold end -> activator.forward      (recency)
    activator.forward                  (the first inference on the pod)
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.common import pct

HOPS = [
    ("resolve", ("activator.request", "start"), ("activator.hold", "start")),
    ("ask", ("activator.hold", "start"), ("placement.decide", "start")),
    ("decide", ("placement.decide", "start"), ("placement.decide", "end")),
    ("order", ("placement.decide", "end"), ("loader.pull", "start")),
    ("pull", ("loader.pull", "start"), ("loader.pull", "end")),
    ("pull_to_load", ("loader.pull", "end"), ("loader.load", "start")),
    ("load", ("loader.load", "start"), ("loader.load", "end")),
    ("event", ("loader.load", "end"), ("placement.loaded", "start")),
    ("loaded", ("placement.loaded", "start"), ("placement.loaded", "end")),
    ("wake", ("placement.loaded", "end"), ("activator.hold", "end")),
    ("touch", ("activator.hold", "end"), ("activator.forward", "start")),
    ("forward", ("activator.forward", "start"), ("activator.forward", "end")),
    ("respond", ("activator.forward", "end"), ("activator.request", "end")),
]


class Collector:
    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[dict[str, Any]] = []
        lock = threading.Lock()
        spans = self.spans

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                got = []
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            attrs = {a.key: a.value.string_value for a in s.attributes}
                            got.append({"trace": s.trace_id.hex(), "name": s.name, "start": s.start_time_unix_nano,
                                        "end": s.end_time_unix_nano, "model": attrs.get("meshserve.model", ""), "name": attrs.get("meshserve.name", ""),
                                        "outcome": attrs.get("meshserve.outcome", "")})
                with lock:
                    spans.extend(got)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_address[1]
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{port}/v1/traces"
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"

    def close(self) -> None:
        self.server.shutdown()
        os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)


def hops(spans: list[dict[str, Any]], models: set[str]) -> dict[str, dict[str, float]]:
    """p50/p99 in ms of each hop over the traces of cold requests for `models` (one span of each
    name per trace: the first)."""
    by_trace: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in sorted(spans, key=lambda s: s["start"]):
        by_trace[s["trace"]].setdefault(s["name"], s)
    out: dict[str, list[float]] = defaultdict(list)
    for t in by_trace.values():
        req = t.get("activator.request")
        if req is None or req["name"] not in models:
            continue
        for name, (a, ea), (b, eb) in HOPS:
            if a in t and b in t:
                out[name].append((t[b][eb] - t[a][ea]) / 1e6)
        if "activator.request" in t:
            out["total"].append((req["end"] - req["start"]) / 1e6)
    return {k: {"n": len(v), "p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2)} for k, v in out.items()}
