"""`meshserve up` at idle (issue 19: ≤ 700 MiB): the RSS of every process it runs, and the first
load of each format on a fresh runtime (what lazy imports cost the first model of a format).

Starts `meshserve up` with the repository's mesh-config (the example model registered, none
loaded), waits until the total RSS has been steady for a few seconds (imports done, nothing
loading), then records per process: RSS (what the issue's figure sums) and PSS (shared library
pages split between the processes that map them, so the sum is what the machine really gives).
Then loads one model of each format the fixtures hold on pod 0 directly through its repository
API, timing each: the first load of a format includes its libraries' import when the runtime
imports them on demand.

    .venv/bin/python -m bench.up_rss [--out up_rss] [--no-formats]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import REPO, write
from meshserve_testing import devmesh

FIXTURES = REPO.parent / "shared" / "fixtures" / "modelmesh-examples" / "bucket" / "fvt"
# One model per format the built-in runtime imports a library for: (format, fixture folder).
FORMATS = (("sklearn", "sklearn/mnist-svm/model.joblib"), ("xgboost", "xgboost/mushroom/model.json"),
           ("lightgbm", "lightgbm/mushroom/model.bst"), ("onnx", "onnx/onnx-mnist/mnist-8.onnx"))


def _rollup_kib(pid: int) -> dict[str, int]:
    """The process's memory totals from smaps_rollup, kB by name (Rss, Pss...); {} once it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren...: the kernel's own list of each process's children."""
    out, todo = [], [pid]
    while todo:
        try:
            kids = [int(c) for f in Path(f"/proc/{todo.pop()}/task").glob("*/children") for c in f.read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def processes(up_pid: int, named: dict[str, int]) -> dict[str, int]:
    """Every process of the mesh, name -> pid: `up` itself, the components it names in pids.json,
    and their children (a loader's runtime: `runtime-<i>`; anything else by its pid)."""
    out = {"up": up_pid, **named}
    for name, pid in named.items():
        for p in _descendants(pid):
            label = name.replace("loader-", "runtime-") if name.startswith("loader-") else f"{name}-child"
            out[label if label not in out else f"{label}-{p}"] = p
    return out


def snapshot(procs: dict[str, int]) -> dict[str, dict[str, float]]:
    rollups = {name: _rollup_kib(pid) for name, pid in sorted(procs.items())}
    return {name: {"rss_mib": round(r.get("Rss", 0) / 1024, 1), "pss_mib": round(r.get("Pss", 0) / 1024, 1)} for name, r in rollups.items()}


def total(snap: dict[str, dict[str, float]], key: str) -> float:
    return round(sum(v[key] for v in snap.values()), 1)


def wait_idle(m: devmesh.Mesh, steady_s: float = 6.0, most_s: float = 120.0) -> dict[str, dict[str, float]]:
    """Sample every second until the total RSS moved by under 1% over `steady_s` seconds."""
    assert m.proc is not None
    deadline, history = time.monotonic() + most_s, []
    while True:
        snap = snapshot(processes(m.proc.pid, m.pids()))
        history.append(total(snap, "rss_mib"))
        window = history[-int(steady_s) - 1 :]
        if len(window) > steady_s and max(window) - min(window) < 0.01 * max(window) or time.monotonic() > deadline:
            return snap
        time.sleep(1.0)


def first_loads(m: devmesh.Mesh) -> dict[str, float]:
    """Pod 0 loads one model of each format through its repository API (a file under the PVC
    root, as the loader passes it), ms per load; the first of each format pays its imports."""
    out: dict[str, float] = {}
    for fmt, file in FORMATS:
        src = FIXTURES / file
        if not src.exists():
            continue
        dest = m.data_dir / "pvc" / "bench" / file
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        body = json.dumps({"parameters": {"path": str(dest), "format": fmt}}).encode()
        req = urllib.request.Request(f"{m.pod_control(0)}/v2/repository/models/first-{fmt}/load", data=body, method="POST")
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=180) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"loading {fmt} from {dest}: {e.code} {e.read()[:500]!r}") from None
        out[fmt] = round((time.perf_counter() - t0) * 1000, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="up_rss", help="result name under bench/results/")
    ap.add_argument("--no-formats", action="store_true", help="skip the first load of each format")
    args = ap.parse_args()
    t0 = time.monotonic()
    with devmesh.mesh(pods=2, timeout=300) as m:
        up_s = time.monotonic() - t0
        idle = wait_idle(m)
        loads = {} if args.no_formats else first_loads(m)
    res = {
        "pods": 2,
        "up_seconds": round(up_s, 1),
        "idle": idle,
        "idle_rss_mib_total": total(idle, "rss_mib"),
        "idle_pss_mib_total": total(idle, "pss_mib"),
        "first_load_ms": loads,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(res, indent=2))
    print(f"wrote {write(args.out, res)}")


if __name__ == "__main__":
    main()
