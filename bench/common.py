"""Shared benchmark helpers: a mesh with tiny models, percentiles, JSON output, machine facts."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from meshserve_testing import devmesh

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
    }


def cpu_s(pid: int) -> float:
    """A process's CPU time so far, summed over its threads from /proc's schedstat (ns; the
    clock-tick counters in stat are 10 ms coarse, more than one load or cold request costs)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def write(name: str, doc: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **doc}
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(doc, indent=2) + "\n")
    return p


@contextmanager
def string_model_mesh(tmp: Path, names: list[str], pods: int = 2, **extra: object) -> Iterator[devmesh.Mesh]:
    """A mesh whose config registers tiny string models (their files written before start)."""
    cfg = tmp / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "models.yaml").write_text("---\n".join(devmesh.inference_service(n, "string", devmesh.pvc_storage("bench", f"{n}.txt")) for n in names))
    with devmesh.mesh(config_dir=cfg, pods=pods, **extra) as m:
        d = m.data_dir / "pvc" / "bench"
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            (d / f"{n}.txt").write_text(f"hello from {n}")
        yield m


def install_hey() -> None:
    """`hey` is Debian's package (Go): the load generator stays out of Python's hot loop."""
    if shutil.which("hey"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("the benchmarks need `hey`: apt-get install hey")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "hey"], env=env, check=True)


def hey(url: str, body: Path, rps: int, seconds: int, workers: int = 20, headers: tuple[str, ...] = ()) -> dict[str, float]:
    """Rate-limited load with `hey` (Go, not Python's loop); exact percentiles from its CSV.
    `rps` 0: no limit, each worker sends its next request when the last is answered (saturation)."""
    limit = ["-q", str(max(1, rps // workers))] if rps > 0 else []
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(workers), *limit, "-m", "POST", "-D", str(body), "-o", "csv", url]
    for h in headers:
        cmd[1:1] = ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    lat, codes = [], []
    for line in out.stdout.splitlines()[1:]:
        parts = line.split(",")
        if len(parts) < 7:
            continue
        lat.append(float(parts[0]) * 1000)
        codes.append(int(parts[6]))
    ok = sum(1 for c in codes if c == 200)
    return {
        "target_rps": rps,
        "achieved_rps": round(len(lat) / seconds, 1),
        "requests": len(lat),
        "errors": len(lat) - ok,
        "p50_ms": round(pct(lat, 50), 3),
        "p99_ms": round(pct(lat, 99), 3),
        "mean_ms": round(statistics.fmean(lat), 3) if lat else float("nan"),
    }
