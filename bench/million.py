"""1,000,000 registered models, 100,000 of them loaded, on one machine (issue 19): does the
control plane run, and what does it cost?

Real Valkey filled through the store's own encoders (ModelSpec.to_json, Pod.to_json,
copies_to_json; pipelined HSETs of 10,000 fields), then the production processes against it:
`python -m meshserve_xds` and `python -m meshserve_placement` (its leader takes the lease and
reloads). No Envoy and no runtimes: the pods are records with fresh heartbeats.

Records:
- fill_s: writing the hashes;
- xds_ready_s: the xDS process's start until /healthz is ready (first snapshot in the cache:
  read, parse, build, pack), and its own `meshserve_xds_build_seconds` for that;
- full_build_s: the scoped layout's full build plus SnapshotCache.set on that state, in this
  process (what bench/xds_build.py times), after the servers are stopped;
- reload_s: the leader's log from "took the placement lease" to "state reloaded";
- rss_mib: each process once both are up and settled, and their sum with Valkey's.

    .venv/bin/python -m bench.million [--registered 1000000] [--loaded 100000] [--pods 20]

Writes bench/results/million.json.

`--publish` times the xDS source's whole-state publish alone (`RedisSource._publish`: routing
state, `build_full`, the cache) on the same shape made in memory, no Valkey, in a fresh process
per measurement: wall and CPU seconds and the RSS it adds; then a fresh gateway's first delta
answers from that cache (`first_delta`). With `--baseline TREE` (another
checkout, e.g. `git archive <commit> | tar -x -C /tmp/base`) the baseline's xDS code and this
one alternate, side by side in one run:

    .venv/bin/python -m bench.million --publish --registered 1000000 --loaded 100000 --baseline /tmp/base --rounds 2

Writes bench/results/million_publish.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from bench.common import write
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve.store import State, keys
from meshserve_testing import devmesh

CHUNK = 10_000


def spec(i: int) -> ModelSpec:
    name = f"m{i:07d}"
    return ModelSpec(id=f"{name}__isvc-{i:010x}", alias=name, format="sklearn",
                     storage={"parameters": {"type": "pvc", "name": "million"}, "path": f"models/{name}"}, size_hint=1 << 20)


def spec_json(sample: int = 200) -> Callable[[int], str]:
    """`spec(i).to_json()` for any i, from a template: the encoder runs once on a placeholder
    spec, and the result is checked against the encoder's own output for `sample` indexes.
    `to_json` (dataclasses.asdict) costs ~30 us a model, minutes at a million."""
    name, hexid = "m0000000", "0000000000"
    tpl = spec(0).to_json()
    assert tpl.count(hexid) == 1  # the placeholder strings occur only where the index goes
    parts = [p.split(hexid) for p in tpl.split(name)]

    def enc(i: int) -> str:
        n, h = f"m{i:07d}", f"{i:010x}"
        return n.join(h.join(p) for p in parts)

    for i in [*range(sample), *range(10**6 - 1, 10**6 - sample, -1)]:
        assert enc(i) == spec(i).to_json(), i
    return enc


async def fill(url: str, registered: int, loaded: int, pods: int) -> float:
    """Every hash the control plane reads, in the store's encodings (ModelSpec.to_json through
    a checked template, Pod.to_json, copies_to_json)."""
    s = State.from_url(url)
    t0 = time.perf_counter()
    try:
        ps = [Pod(f"pod-{k}", "127.0.0.1", 20000 + 2 * k, 20001 + 2 * k, 1 << 40, formats=["sklearn"]) for k in range(pods)]
        now = time.time()
        async with s.r.pipeline(transaction=False) as p:
            p.hset(keys.PODS, mapping={x.id: x.to_json() for x in ps})
            p.zadd(keys.HEARTBEATS, {x.id: now + 3600 for x in ps})
            await p.execute()
        enc = spec_json()
        copies = [copies_to_json({x.id: Copy(CopyState.LOADED, 1 << 20, now)}) for x in ps]
        for start in range(0, registered, CHUNK):
            idx = range(start, min(registered, start + CHUNK))
            ids = {i: f"m{i:07d}__isvc-{i:010x}" for i in idx}  # spec(i).id, checked by spec_json
            async with s.r.pipeline(transaction=False) as p:
                p.hset(keys.MODELS, mapping={ids[i]: enc(i) for i in idx})
                p.hset(keys.ALIASES, mapping={f"m{i:07d}": ids[i] for i in idx})
                placed = {ids[i]: copies[i % pods] for i in idx if i < loaded}
                if placed:
                    p.hset(keys.PLACEMENTS, mapping=placed)
                await p.execute()
        await s.r.incr(keys.REV)
        return time.perf_counter() - t0
    finally:
        await s.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def _log_ts(path: Path, needle: str) -> float | None:
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if needle in doc.get("msg", ""):
            return float(doc["ts"])
    return None


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _settled(pid: int, quiet_s: float = 3.0, most_s: float = 60.0) -> float:
    last = rss_mib(pid)
    t0 = time.monotonic()
    while time.monotonic() - t0 < most_s:
        time.sleep(quiet_s)
        now = rss_mib(pid)
        if abs(now - last) < 2:
            return now
        last = now
    return last


async def full_build(url: str) -> dict[str, float]:
    """The production source's resync in this process: read and parse, then build and pack."""
    from meshserve_xds.cache import SnapshotCache
    from meshserve_xds.source import RedisSource, read_snapshot

    state = State.from_url(url)
    try:
        src = RedisSource(Settings(redis_url=url), state, SnapshotCache())
        t0 = time.perf_counter()
        snap = await read_snapshot(state)  # what a resync reads
        t1 = time.perf_counter()
        src.snap = snap
        gc.collect()
        t2 = time.perf_counter()
        src._publish()  # noqa: SLF001 - the build alone, on the snapshot just read
        t3 = time.perf_counter()
        return {"read_parse_s": round(t1 - t0, 2), "build_s": round(t3 - t2, 2)}
    finally:
        await state.close()


def run(registered: int, loaded: int, pods: int, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {"registered": registered, "loaded": loaded, "pods": pods}
    with devmesh.valkey() as v, tempfile.TemporaryDirectory(prefix="ms-million-") as tmp:
        out["fill_s"] = round(asyncio.run(fill(v.url, registered, loaded, pods)), 1)
        out["valkey_rss_mib"] = rss_mib(v.proc.pid)
        print(f"filled in {out['fill_s']} s; valkey {out['valkey_rss_mib']} MiB", flush=True)
        port = devmesh.free_port
        env = {**os.environ, "MESHSERVE_REDIS_URL": v.url, "MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_LOG_JSON": "true",
               "MESHSERVE_XDS_PORT": str(port()), "MESHSERVE_XDS_DEBUG_PORT": str(port()), "MESHSERVE_XDS_DEBUG_HOST": "127.0.0.1",
               "MESHSERVE_ACTIVATOR_REST_PORT": str(port()), "MESHSERVE_ACTIVATOR_GRPC_PORT": str(port()),
               "MESHSERVE_PLACEMENT_METRICS_PORT": str(port()), "MESHSERVE_DATA_DIR": tmp, "MESHSERVE_CONFIG_DIR": tmp}
        xlog, plog = Path(tmp) / "xds.log", Path(tmp) / "placement.log"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            t0 = time.monotonic()
            with open(xlog, "wb") as f:
                xds = subprocess.Popen([sys.executable, "-m", "meshserve_xds"], env=env, stdout=f, stderr=subprocess.STDOUT)
            procs.append(xds)
            health = f"http://127.0.0.1:{env['MESHSERVE_XDS_DEBUG_PORT']}"
            devmesh.wait_until(lambda: xds.poll() is not None or _get(health + "/healthz")[0] == 200, timeout, "xds ready", interval=0.2)
            if xds.poll() is not None:
                raise RuntimeError(xlog.read_text()[-3000:])
            out["xds_ready_s"] = round(time.monotonic() - t0, 1)
            m = _get(health + "/metrics")[1]
            out["xds_build_seconds"] = _metric(m, "meshserve_xds_build_seconds_sum")
            print(f"xds ready in {out['xds_ready_s']} s (its build {out['xds_build_seconds']} s)", flush=True)
            with open(plog, "wb") as f:
                pl = subprocess.Popen([sys.executable, "-m", "meshserve_placement"], env=env, stdout=f, stderr=subprocess.STDOUT)
            procs.append(pl)
            devmesh.wait_until(lambda: pl.poll() is not None or _log_ts(plog, "state reloaded") is not None, timeout, "leader reloaded", interval=0.5)
            if pl.poll() is not None:
                raise RuntimeError(plog.read_text()[-3000:])
            took, done = _log_ts(plog, "took the placement lease"), _log_ts(plog, "state reloaded")
            out["reload_s"] = round(done - took, 2) if took and done else None
            print(f"leader reloaded in {out['reload_s']} s", flush=True)
            out["rss_mib"] = {"xds": _settled(xds.pid), "placement": _settled(pl.pid), "valkey": rss_mib(v.proc.pid)}
            out["rss_mib"]["total"] = round(sum(out["rss_mib"].values()), 1)
            print(f"rss {out['rss_mib']}", flush=True)
        finally:
            for p in procs:
                devmesh.stop(p)
        out["in_process"] = asyncio.run(full_build(v.url))
        print(f"in-process full build {out['in_process']}", flush=True)
    out["load_avg"] = round(os.getloadavg()[0], 1)
    return out


def publish_worker(registered: int, loaded: int, pods: int) -> dict[str, Any]:
    """The xDS source's full publish on a snapshot like the one `fill` writes, as read back
    (`read_snapshot`: ids only), in this process."""
    from meshserve.store.state import Snapshot
    from meshserve_xds.cache import SnapshotCache
    from meshserve_xds.resources import GATEWAY_GROUP
    from meshserve_xds.source import RedisSource

    ids = [spec(i).id if i < 2 else f"m{i:07d}__isvc-{i:010x}" for i in range(registered)]
    assert ids[1] == spec(1).id
    ps = {f"pod-{k}": Pod(f"pod-{k}", "127.0.0.1", 20000 + 2 * k, 20001 + 2 * k, 1 << 40, formats=["sklearn"]) for k in range(pods)}
    snap = Snapshot(rev=1, models=dict.fromkeys(ids), aliases={f"m{i:07d}": ids[i] for i in range(registered)}, pods=ps,  # type: ignore[arg-type]
                    placements={ids[i]: {f"pod-{i % pods}": Copy(CopyState.LOADED, 1 << 20, 1.0)} for i in range(loaded)})
    gc.collect()
    rss0 = rss_mib(os.getpid())
    src = RedisSource(Settings(), None, SnapshotCache())  # type: ignore[arg-type]  # no reads: the snapshot is given
    src.snap = snap
    w0, c0 = time.perf_counter(), time.process_time()
    src._publish()  # noqa: SLF001
    w1, c1 = time.perf_counter(), time.process_time()
    gc.collect()
    g = src.cache.group(GATEWAY_GROUP)
    out = {"wall_s": round(w1 - w0, 2), "cpu_s": round(c1 - c0, 2), "rss_added_mib": round(rss_mib(os.getpid()) - rss0, 1),
           "resources": {t.rsplit(".", 1)[-1]: len(ts.digests) for t, ts in g.types.items()}}
    out["first_delta"] = first_delta(src.cache)
    out["load_avg"] = round(os.getloadavg()[0], 1)
    return out


def first_delta(cache: Any) -> dict[str, float]:
    """A fresh gateway's first delta answers, every type (wildcard), each ACKed, serialized as
    gRPC would send them: what a gateway (re)connecting costs the xDS process."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from meshserve_xds import resources as r
    from meshserve_xds.delta import DeltaStream

    node = base_pb2.Node(id="gw", cluster=r.GATEWAY_GROUP)
    ss = DeltaStream(cache)
    rss0 = rss_mib(os.getpid())
    w0, c0 = time.perf_counter(), time.process_time()
    sent = 0
    for t in r.PUSH_ORDER:
        ss.on_request(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=t))
        while True:  # batched types answer a batch per ACK
            resps = ss.due()
            sent += sum(len(x.SerializeToString()) for x in resps)
            acks = [discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=tt, response_nonce=ts.nonce) for tt, ts in ss.types.items() if ts.pending]
            for a in acks:
                ss.on_request(a)
            if not resps:
                break
    w1, c1 = time.perf_counter(), time.process_time()
    return {"wall_s": round(w1 - w0, 2), "cpu_s": round(c1 - c0, 2), "sent_mb": round(sent / 1e6, 1),
            "rss_after_mib": round(rss_mib(os.getpid()) - rss0, 1)}


def publish_versus(args: argparse.Namespace) -> dict[str, Any]:
    """This tree's xDS code, and the baseline's (its component folders first on PYTHONPATH)
    when given, alternating in fresh processes."""
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here, **({"baseline": Path(args.baseline)} if args.baseline else {})}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for i in range(args.rounds):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            env = dict(os.environ)
            if name == "baseline":
                folders = sorted({str(p.parent) for p in trees[name].glob("*/meshserve_*") if p.is_dir()})
                env["PYTHONPATH"] = os.pathsep.join([*folders, str(trees[name])])
            # This file's worker, loaded by path: the baseline's packages come first on the path.
            cmd = [sys.executable, "-c", "import importlib.util as u, json, sys; s = u.spec_from_file_location('million_here', sys.argv[1]); "
                   "m = u.module_from_spec(s); s.loader.exec_module(m); print(json.dumps(m.publish_worker(*map(int, sys.argv[2:]))))",
                   __file__, str(args.registered), str(args.loaded), str(args.pods)]
            out = subprocess.run(cmd, env=env, cwd=trees[name], capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]}", flush=True)
    return {"registered": args.registered, "loaded": args.loaded, "pods": args.pods, "baseline": args.baseline, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registered", type=int, default=1_000_000)
    ap.add_argument("--loaded", type=int, default=100_000)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--publish", action="store_true", help="time the xDS publish alone, in memory (no Valkey)")
    ap.add_argument("--baseline", help="with --publish: another checkout to alternate with")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.publish:
        res = publish_versus(args)
        res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write("million_publish", res)
        return
    res = run(args.registered, args.loaded, args.pods, args.timeout)
    res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(res), flush=True)
    write("million", res)


if __name__ == "__main__":
    main()
