"""Per-hop timing of the cold path from the components' own trace spans (issue 19 §4).

Every process of the mesh writes its spans to a file when MESHSERVE_TRACE_FILE is set
(meshserve/tracing.py). `Collector` sets it before the mesh starts (its processes inherit it)
and reads the spans back; `hops()` splits each cold request's trace into the hops below. All
processes run on one machine, so their clocks agree.

    activator.request -> activator.hold (resolve the name)
    hold -> placement.decide           (activator reads copies, asks; leader wakes, refreshes)
    placement.decide                   (policy, commit of copy + order)
    decide -> loader.pull              (order reaches the loader)
    loader.pull, loader.load           (files; the runtime's load)
    load -> placement.loaded           (result event reaches the leader)
    placement.loaded                   (leader commits the copy LOADED)
    loaded -> hold end                 (activator wakes, reads the copy and pod)
    load -> hold end                   (the three above; or the activator's own read of the result)
    hold end -> activator.forward      (recency)
    activator.forward                  (the first inference on the pod)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
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
    ("hold", ("activator.hold", "start"), ("activator.hold", "end")),  # the whole wait for a copy
    ("result_to_hold_end", ("loader.load", "end"), ("activator.hold", "end")),  # event + loaded + wake, or the direct path
    ("touch", ("activator.hold", "end"), ("activator.forward", "start")),
    ("forward", ("activator.forward", "start"), ("activator.forward", "end")),
    ("respond", ("activator.forward", "end"), ("activator.request", "end")),
]


class Collector:
    """Makes the mesh's processes (started after this) write their spans to files here
    (meshserve/tracing.py JsonLinesExporter, exported every 200 ms), and reads them back."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ms-hops-")
        os.environ["MESHSERVE_TRACE_FILE"] = os.path.join(self.dir, "spans")
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"

    @property
    def spans(self) -> list[dict[str, Any]]:
        out = []
        for p in Path(self.dir).glob("spans.*"):
            for line in p.read_text().splitlines():
                if line.strip():
                    s = json.loads(line)
                    a = s.pop("attributes")
                    s.update(model=a.get("meshserve.model", ""), name_attr=a.get("meshserve.name", ""))
                    out.append(s)
        return out

    def close(self) -> None:
        os.environ.pop("MESHSERVE_TRACE_FILE", None)
        shutil.rmtree(self.dir, ignore_errors=True)


def hops(spans: list[dict[str, Any]], models: set[str], slowest: float = 0.0) -> dict[str, dict[str, float]]:
    """p50/p99 in ms of each hop over the traces of cold requests for `models` (one span of each
    name per trace: the first). `slowest`: only that fraction of the requests, the slowest by
    their activator.request span (where the tail's time goes)."""
    by_trace: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in sorted(spans, key=lambda s: s["start"]):
        by_trace[s["trace"]].setdefault(s["name"], s)
    out: dict[str, list[float]] = defaultdict(list)
    traces = [t for t in by_trace.values() if "activator.request" in t and t["activator.request"]["name_attr"] in models]
    if slowest:
        traces.sort(key=lambda t: t["activator.request"]["end"] - t["activator.request"]["start"], reverse=True)
        traces = traces[: max(1, int(len(traces) * slowest))]
    for t in traces:
        req = t["activator.request"]
        for name, (a, ea), (b, eb) in HOPS:
            if a in t and b in t:
                out[name].append((t[b][eb] - t[a][ea]) / 1e6)
        if "activator.request" in t:
            out["total"].append((req["end"] - req["start"]) / 1e6)
    return {k: {"n": len(v), "p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2)} for k, v in out.items()}
