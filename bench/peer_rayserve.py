"""Against a peer (issue 19): meshserve and Ray Serve multiplexing, side by side in one run.

The same model (the digits SVM the mesh's example loader writes, one file; every model name is
its own copy of it), 2 runtime processes each (meshserve: 2 pods; Ray: 2 replicas of a
`@serve.multiplexed` deployment, bench/peer_rayserve_app.py, from Ray's own venv .venv-ray), the
same number of models resident (meshserve's pod capacity = Ray's `max_num_models_per_replica`),
the same clients (`hey` for one model, churn.py's open-loop generator for many). Five figures:

1. one hot model at saturation (`hey`, 24 connections, no rate limit): req/s, p99;
2. one hot model at fixed rates (100/300/600 rps): p99, errors;
3. Zipf(1.0) over 1,000 models at 40 rps, open loop: p50, p99, answers by status;
4. cold start: 30 models never requested before, one at a time: p50, p99;
5. memory: fresh systems idle, then with 200 models loaded: RSS of all their processes.

Points 1-4 alternate meshserve and Ray (which goes first alternates too), 3 runs each (medians
reported), with a pause between points for queues to drain; both systems stay up throughout.
Point 5 starts each system afresh, one at a time. Before point 1, Ray's `max_ongoing_requests`
is chosen: the candidate with the most req/s at saturation.

Ray binds internal servers on every interface, so the whole run (both systems, the clients)
runs in a network namespace of its own with only loopback up (`unshare -n`, needs root):
both sides are reached on 127.0.0.1 the same way.

    .venv/bin/python -m bench.peer_rayserve [--quick]    # -> bench/results/peer_rayserve.json, .png
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.metadata import version
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from bench import churn
from bench.common import REPO, hey, install_hey, pct, write
from bench.density import rss_mib
from meshserve_testing import devmesh
from meshserve_testing.sidevenv import ensure

RAY_HEADER = "serve_multiplexed_model_id"
IN_NETNS = "MESHSERVE_PEER_NETNS"
APP = Path(__file__).resolve().parent / "peer_rayserve_app.py"


def ray_python() -> Path:
    # The model is a pickle: Ray's side unpickles it with our scikit-learn, joblib and numpy.
    pins = tuple(f"{p}=={version(p)}" for p in ("scikit-learn", "joblib", "numpy"))
    return ensure(REPO, ".venv-ray", ("ray[serve]", *pins))


@dataclass
class Side:
    name: str
    base: str
    header: str  # where the model's name goes besides the path ("" for meshserve: the path)
    rss: Callable[[], float]

    def url(self, model: str) -> str:
        return f"{self.base}/v2/models/{model}/infer"

    def headers(self, model: str) -> dict[str, str]:
        return {self.header: model} if self.header else {}

    def infer(self, model: str, timeout: float = 120) -> tuple[int, float]:
        t0 = time.perf_counter()
        req = urllib.request.Request(self.url(model), data=churn.BODY, method="POST", headers=self.headers(model))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                code = r.status if json.loads(r.read())["outputs"][0]["data"] == [8] else -1
        except urllib.error.HTTPError as e:
            code = e.code
        except Exception:  # noqa: BLE001 - a reset or time-out counts as a failed answer
            code = 0
        return code, (time.perf_counter() - t0) * 1000


class RayServe:
    """The Ray side's process (bench/peer_rayserve_app.py), driven over its stdin."""

    def __init__(self, py: Path, model: Path, log: Path):
        self.port = devmesh.free_port()
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([str(py), str(APP), str(model), str(self.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        self.info = self._reply("up", 300)
        self.side = Side("ray", f"http://127.0.0.1:{self.port}", RAY_HEADER, lambda: rss_mib(self.proc.pid))

    def _reply(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Ray's side exited ({self.proc.returncode}); see {self.log.name}") from None
                continue
            if line.startswith("@@ ") and key in (doc := json.loads(line[3:])):
                return doc
        raise TimeoutError(f"Ray's side: no {key!r} in {timeout}s; see {self.log.name}")

    def deploy(self, k: int, max_ongoing: int) -> None:
        self.proc.stdin.write(json.dumps({"op": "deploy", "k": k, "max_ongoing": max_ongoing}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        self._reply("deployed", 300)

    def stop(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # Ray's node processes share its session
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        self.log.close()


# -- the measurements, each on one side ---------------------------------------------------------

def saturation(s: Side, model: str, body: Path, seconds: int, conns: int) -> dict[str, Any]:
    return hey(s.url(model), body, 0, seconds, workers=conns, headers=_hey_headers(s, model))


def fixed(s: Side, model: str, body: Path, seconds: int, rps: int) -> dict[str, Any]:
    # 10 rps a worker: `hey` workers wait for each answer, so one holds its rate up to 100 ms.
    return hey(s.url(model), body, rps, seconds, workers=max(1, rps // 10), headers=_hey_headers(s, model))


def _hey_headers(s: Side, model: str) -> tuple[str, ...]:
    return ("Content-Type: application/json", *(f"{k}: {v}" for k, v in s.headers(model).items()))


def zipf(s: Side, names: list[str], rps: float, seconds: float, seed: int) -> dict[str, Any]:
    seq = churn.zipf_sequence(names, int(rps * seconds), 1.0, seed)
    out = churn.summary(churn.run(s.base, seq, rps, name_header=s.header))
    return {"p50_ms": out["latency_ms"]["p50"], "p99_ms": out["latency_ms"]["p99"], "errors": out["requests"] - out["by_status"].get("200", 0),  # type: ignore[index, union-attr, operator]
            **out}


def cold(s: Side, names: list[str]) -> dict[str, Any]:
    answers = [s.infer(n) for n in names]
    ms = [t for _, t in answers]
    return {"p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2), "errors": sum(c != 200 for c, _ in answers), "samples_ms": [round(t, 2) for t in ms]}


def median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}


# -- the run ------------------------------------------------------------------------------------

def side_by_side(sides: list[Side], repeats: int, pause: float, point: str, measure: Callable[[Side, int], dict[str, Any]]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
    for rep in range(repeats):
        for s in sides if rep % 2 == 0 else sides[::-1]:
            r = measure(s, rep)
            runs[s.name].append(r)
            print(f"{point} {s.name} run {rep + 1}: {json.dumps({k: v for k, v in r.items() if k != 'samples_ms' and k != 'non_200_samples'})}", flush=True)
            time.sleep(pause)  # queues drain, loads settle, before the next point
    return {n: {"median": median_of(r), "runs": r} for n, r in runs.items()}


def model_file(mesh: devmesh.Mesh) -> Path:
    return devmesh.wait_until(lambda: next((mesh.data_dir / "pvc").rglob("mnist-svm.joblib"), None), 120, "the example model file")


def run(a: argparse.Namespace) -> dict[str, Any]:
    py = ray_python()
    doc: dict[str, Any] = {"config": {k: v for k, v in vars(a).items()}, "load_average_before": os.getloadavg()}
    doc.update(hot_and_churn(a, py))
    doc.update(cold_and_memory(a, py, doc["max_ongoing_requests"]))
    doc["load_average_after"] = os.getloadavg()
    doc["table"] = table(doc)
    return doc


@contextmanager
def both(a: argparse.Namespace, py: Path, registered: int, room: int, max_ongoing: int | None) -> Iterator[tuple[Side, RayServe, list[str], Path, devmesh.Mesh]]:
    """A fresh mesh and a fresh Ray Serve, each with room for `room` models per runtime process."""
    with tempfile.TemporaryDirectory(prefix="ms-peer-ray-") as tmp, churn.churn_mesh(Path(tmp), registered, room) as (mesh, names):
        body = Path(tmp) / "body.json"
        body.write_bytes(churn.BODY)
        model = Path(tmp) / "mnist-svm.joblib"
        model.write_bytes(model_file(mesh).read_bytes())
        ray = RayServe(py, model, Path(tmp) / "ray.log")
        try:
            if max_ongoing:
                ray.deploy(room, max_ongoing)
            yield Side("meshserve", mesh.rest, "", lambda: rss_mib(mesh.proc.pid)), ray, names, body, mesh  # type: ignore[union-attr]
        finally:
            ray.stop()


def hot_and_churn(a: argparse.Namespace, py: Path) -> dict[str, Any]:
    """Points 1-3, and cold starts with the caches full (each load evicts), room `per_pod`."""
    zipf_n, cold_n = a.zipf_models, a.cold_models
    out: dict[str, Any] = {}
    with both(a, py, zipf_n + a.repeats * cold_n + 1, a.per_pod, None) as (ms, ray, names, body, _):
        out["ray_version"], hot = ray.info["ray"], names[-1]
        zipf_names, cold_names = names[:zipf_n], names[zipf_n:-1]
        sweep = []
        for mo in a.max_ongoing:
            ray.deploy(a.per_pod, mo)
            ray.side.infer(hot)
            r = saturation(ray.side, hot, body, a.seconds, a.connections)
            sweep.append({"max_ongoing_requests": mo, **r})
            print(f"ray max_ongoing_requests={mo}: {json.dumps(r)}", flush=True)
            time.sleep(a.pause)
        best = max(sweep, key=lambda r: r["achieved_rps"])["max_ongoing_requests"]
        out["max_ongoing_sweep"], out["max_ongoing_requests"] = sweep, best
        ray.deploy(a.per_pod, best)
        sides = [ms, ray.side]
        for s in sides:
            assert s.infer(hot)[0] == 200, f"{s.name} does not answer the hot model"
        time.sleep(2.0)  # meshserve: the hot model's route reaches the gateway
        p: dict[str, Any] = {}
        p["saturation"] = side_by_side(sides, a.repeats, a.pause, "saturation", lambda s, _: saturation(s, hot, body, a.seconds, a.connections))
        for rps in a.rates:
            p[f"fixed_{rps}"] = side_by_side(sides, a.repeats, a.pause, f"fixed {rps}", lambda s, _, rps=rps: fixed(s, hot, body, a.seconds, rps))
        p["zipf"] = side_by_side(sides, a.repeats, a.pause, "zipf", lambda s, rep: zipf(s, zipf_names, a.zipf_rps, a.zipf_seconds, 19 + rep))
        p["cold_evicting"] = side_by_side(sides, a.repeats, a.pause, "cold (caches full)", lambda s, rep: cold(s, cold_names[rep * cold_n:(rep + 1) * cold_n]))
        out["points"] = p
    return out


def cold_and_memory(a: argparse.Namespace, py: Path, max_ongoing: int) -> dict[str, Any]:
    """Fresh systems with room for more than `memory_models`: RSS idle, cold starts (3 × 30 new
    models, alternating, nothing to evict), the rest of the `memory_models` loaded, RSS again."""
    room = max(a.memory_models, a.repeats * a.cold_models) // 2 + 10
    with both(a, py, max(a.memory_models, a.repeats * a.cold_models), room, max_ongoing) as (ms, ray, names, _, mesh):
        sides = [ms, ray.side]
        time.sleep(a.settle)
        mem: dict[str, Any] = {"room_per_runtime": room, **{s.name: {"idle_mib": s.rss()} for s in sides}}
        cold_names = names[: a.repeats * a.cold_models]
        c = side_by_side(sides, a.repeats, a.pause, "cold", lambda s, rep: cold(s, cold_names[rep * a.cold_models:(rep + 1) * a.cold_models]))
        rest = names[len(cold_names): a.memory_models]
        for s in sides:
            answers = [s.infer(n)[0] for n in rest]
            mem[s.name]["non_200"] = sum(x != 200 for x in answers)
        time.sleep(a.settle)
        for s in sides:
            mem[s.name].update(loaded_mib=s.rss(), requested=max(a.memory_models, len(cold_names)))
        mem["meshserve"]["loaded_copies"] = churn.loaded_now(mesh.redis_url)["copies"]
    return {"cold": c, "memory": mem}


def table(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The docs' rows: the figure, each side's medians, and meshserve ÷ Ray of the key number."""
    p, rows = {**doc["points"], "cold": doc["cold"]}, []

    def med(point: str, side: str) -> dict[str, float]:
        return p[point][side]["median"]

    m, r = med("saturation", "meshserve"), med("saturation", "ray")
    rows.append({"figure": "hot model, saturation", "meshserve": m, "ray": r, "ratio": "req/s", "value": round(m["achieved_rps"] / r["achieved_rps"], 2)})
    for k in (k for k in p if k.startswith("fixed_")):
        m, r = med(k, "meshserve"), med(k, "ray")
        rows.append({"figure": f"hot model, {k[6:]} rps", "meshserve": m, "ray": r, "ratio": "p99", "value": round(m["p99_ms"] / r["p99_ms"], 2)})
    for k, key in (("zipf", "p99_ms"), ("cold", "p50_ms"), ("cold_evicting", "p50_ms")):
        m, r = med(k, "meshserve"), med(k, "ray")
        rows.append({"figure": k, "meshserve": m, "ray": r, "ratio": key[:3], "value": round(m[key] / r[key], 2)})
    mm, mr = doc["memory"]["meshserve"], doc["memory"]["ray"]
    rows.append({"figure": "memory", "meshserve": mm, "ray": mr, "ratio": "loaded RSS", "value": round(mm["loaded_mib"] / mr["loaded_mib"], 2)})
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run to check it works: fewer seconds, models and candidates")
    ap.add_argument("--seconds", type=int, default=10, help="per hot-model point")
    ap.add_argument("--connections", type=int, default=24, help="hey's connections at saturation")
    ap.add_argument("--rates", default="100,300,600")
    ap.add_argument("--zipf-models", type=int, default=1000)
    ap.add_argument("--zipf-rps", type=float, default=40.0)
    ap.add_argument("--zipf-seconds", type=float, default=60.0)
    ap.add_argument("--per-pod", type=int, default=30, help="models resident per runtime process, both systems")
    ap.add_argument("--cold-models", type=int, default=30)
    ap.add_argument("--memory-models", type=int, default=200)
    ap.add_argument("--max-ongoing", default="5,16,32,64", help="Ray max_ongoing_requests candidates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pause", type=float, default=5.0, help="between points")
    ap.add_argument("--settle", type=float, default=10.0, help="before each memory reading")
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.zipf_models, a.zipf_seconds, a.cold_models, a.memory_models = 4, 200, 15.0, 8, 40
        a.max_ongoing, a.pause, a.settle, a.per_pod = "5,32", 2.0, 4.0, 10
    a.rates, a.max_ongoing = [int(x) for x in str(a.rates).split(",")], [int(x) for x in str(a.max_ongoing).split(",")]
    if not os.environ.get(IN_NETNS):
        install_hey()
        ray_python()  # installed here, where the network is
        shell = 'ip link set lo up && exec "$@"'
        cmd = ["unshare", "-n", "--", "sh", "-c", shell, "sh", sys.executable, "-m", "bench.peer_rayserve", *argv]
        return subprocess.run(cmd, cwd=REPO, env={**os.environ, IN_NETNS: "1"}).returncode
    doc = run(a)
    print(json.dumps(doc["table"], indent=2))
    path = write("peer_rayserve", doc)
    print(path)
    from bench import plots

    print(plots.peer_rayserve(json.loads(path.read_text())))  # as written: with the machine and date
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
