"""Where an adapter's cold start goes when 1,000 adapters are resident (issue 17), in two parts:

1. `--alone`: two built-in runtime processes with no mesh around them, one holding `--few`
   adapters over the MiniLM base, one `--many`, side by side: each loads a new adapter through
   its repository API and answers its first /v1/embeddings, alternately, on keep-alive
   connections. Does the runtime itself slow down with many adapters?
2. `--cpu`: a mesh (bench/adapters.py's) with `--few` or `--many` adapters resident, then cold
   requests through the gateway one after another: each process's CPU per cold request (from
   /proc, less its idle rate measured just before).

    .venv/bin/python -m bench.adapters_parts --alone          # -> bench/results/adapters_parts.json
    .venv/bin/python -m bench.adapters_parts --cpu
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import adapters as A
from bench.common import REPO, cpu_s, pct, write

TEXT = A.TEXT


def _post(c: http.client.HTTPConnection, path: str, doc: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    c.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    body = r.read()
    assert r.status == 200, (path, r.status, body[:300])


def alone(few: int, many: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp_s:
        tmp = Path(tmp_s)
        files = tmp / "files"
        A.make_files(files, many + rounds, 0)
        env = {**os.environ, "MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_MODEL_ROOTS": str(files), "MESHSERVE_DATA_DIR": str(tmp / "data")}
        procs, ports = [], []
        try:
            for i in range(2):
                pf = tmp / f"ports{i}.json"
                procs.append(subprocess.Popen([sys.executable, "-m", "meshserve_loader.builtin", "--index", str(i), "--ports-file", str(pf)],
                                              env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                deadline = time.monotonic() + 60
                while not (pf.exists() and pf.stat().st_size) and time.monotonic() < deadline:
                    time.sleep(0.1)
                ports.append(json.loads(pf.read_text()))
            conns = [(http.client.HTTPConnection("127.0.0.1", p["control"], timeout=60), http.client.HTTPConnection("127.0.0.1", p["rest"], timeout=60))
                     for p in ports]
            base = str(files / "minilm")
            over = {"base_path": base, "base_format": "sentence-transformers", "base_model": "minilm"}
            sizes = (few, many)
            for i, n in enumerate(sizes):
                _post(conns[i][0], "/v2/repository/models/minilm/load", {"parameters": {"path": base, "format": "sentence-transformers"}})
                for k in range(n):
                    _post(conns[i][0], f"/v2/repository/models/a{k}/load", {"parameters": {"path": str(files / "ad" / f"a{k}"), "format": "peft", **over}})
            got: dict[int, dict[str, list[float]]] = {i: {"load": [], "first_embedding": []} for i in range(2)}
            for k in range(rounds):
                for i in ((0, 1) if k % 2 else (1, 0)):  # which goes first alternates
                    name = f"s{k}"
                    t0 = time.perf_counter()
                    _post(conns[i][0], f"/v2/repository/models/{name}/load", {"parameters": {"path": str(files / "ad" / f"a{many + k}"), "format": "peft", **over}})
                    t1 = time.perf_counter()
                    _post(conns[i][1], "/v1/embeddings", {"model": name, "input": TEXT}, {"mm-model-id": name})
                    t2 = time.perf_counter()
                    _post(conns[i][0], f"/v2/repository/models/{name}/unload", {})
                    got[i]["load"].append((t1 - t0) * 1000)
                    got[i]["first_embedding"].append((t2 - t1) * 1000)
                    time.sleep(0.02)
            return {f"{n}_adapters": {k: round(pct(v, 50), 2) for k, v in got[i].items()} for i, n in enumerate(sizes)} | {"rounds": rounds}
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(10)


def cpu(resident: int, cold: int) -> dict[str, Any]:
    names = [f"a{i}" for i in range(resident)]
    cold_names = [f"a{i}" for i in range(resident, resident + cold + 8)]
    with tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp_s:
        tmp = Path(tmp_s)
        files = tmp / "files"
        A.make_files(files, resident + len(cold_names), 0)
        with A.adapter_mesh(tmp, files, names + cold_names, False, 1024 << 20) as m:
            for n in names:
                A.embed(m.rest, n)
            time.sleep(1.0)
            left = A.base_resident(m, cold_names)[:cold]
            rt = A.runtime_pids(m)
            procs = {**m.pids(), "runtime-0": rt[0], "runtime-1": rt[1]}
            snap = lambda: {k: cpu_s(v) for k, v in procs.items()}  # noqa: E731
            a = snap()
            time.sleep(3)
            b = snap()
            idle = {k: (b[k] - a[k]) / 3 for k in a}
            conns = A.Conns()
            ms = []
            a, t0 = snap(), time.monotonic()
            for n in left:
                ms.append(A.embed(m.rest, n, conns=conns))
            elapsed = time.monotonic() - t0
            b = snap()
            conns.close()
    return {"resident": resident, "cold": len(ms), "cold_p50_ms": round(pct(ms, 50), 2),
            "cpu_ms_per_cold_request": {k: round(1000 * ((b[k] - a[k]) - idle[k] * elapsed) / len(ms), 2) for k in a},
            "idle_cpu_ms_per_s": {k: round(1000 * v, 2) for k, v in idle.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alone", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--few", type=int, default=40)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--out", default="adapters_parts")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"params": vars(args), "load_average_start": os.getloadavg()}
    if args.alone:
        res["alone"] = alone(args.few, args.many, args.rounds)
        print(json.dumps(res["alone"], indent=1), flush=True)
    if args.cpu:
        res["cpu"] = [cpu(n, args.rounds) for n in (args.few, args.many)]
        print(json.dumps(res["cpu"], indent=1), flush=True)
    res["load_average_end"] = os.getloadavg()
    if args.out:
        print(write(args.out, res))
    return res


if __name__ == "__main__":
    main()
