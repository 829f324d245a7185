"""Helpers for the runtime-pod fault cases (case 3, the rolling restart): a mesh config whose
model keeps two copies, the processes of a local pod, and where the gateway and placement
say a model's copies are."""

from __future__ import annotations

import json
import re
import shutil
import signal
import os
import time
from pathlib import Path
from typing import Any

from e2e.faults.load import SteadyLoad
from meshserve_testing import devmesh
from meshserve_testing.xds_harness import gateway_route_dump, model_route_clusters

REPO = Path(__file__).resolve().parents[2]
MODEL = "sklearn-mnist"


def min_copies_config(tmp: Path, copies: int = 2) -> Path:
    """mesh-config/ with the example model annotated minCopies: placement keeps `copies` of it
    loaded, eagerly, on different pods."""
    d = tmp / "mesh-config"
    d.mkdir()
    for f in (REPO / "mesh-config").glob("*.yaml"):
        shutil.copy(f, d / f.name)
    f = d / "sklearn-mnist.yaml"
    text = f.read_text()
    marker = "    serving.kserve.io/deploymentMode: ModelMesh\n"
    assert marker in text, text
    f.write_text(text.replace(marker, marker + f'    meshserve.io/minCopies: "{copies}"\n'))
    return d


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(p.name))
    return out


def kill_pod(m: devmesh.Mesh, index: int, sig: int = signal.SIGKILL) -> tuple[int, list[int]]:
    """Signal the whole local pod `index`: its loader agent and the runtime it runs (a pod's
    containers all die together, as when its node goes). Returns (loader pid, runtime pids)."""
    loader = m.pids()[f"loader-{index}"]
    runtimes = children(loader)
    assert runtimes, f"loader-{index} (pid {loader}) runs no runtime"
    for pid in [loader, *runtimes]:
        os.kill(pid, sig)
    return loader, runtimes


_CLUSTER = re.compile(r"^pods?_(.+)_(rest|grpc)$")


def pods_of_cluster(name: str) -> set[str]:
    """`pod_<id>_rest` -> {id}; `pods_<a>+<b>_rest` (a model's copy set) -> {a, b}."""
    m = _CLUSTER.match(name)
    return set(m.group(1).split("+")) if m else set()


def gateway_pods(m: devmesh.Mesh, model_id: str) -> set[str]:
    """The pods the gateway's REST routes send `model_id` to, from Envoy's config dump."""
    dump = gateway_route_dump(m.admin, timeout=2)
    out: set[str] = set()
    for name in model_route_clusters(dump, model_id):  # either xDS layout
        out |= pods_of_cluster(name)
    return out


def copies(r: Any, model_id: str) -> dict[str, str]:
    """pod -> copy state, as placement wrote it."""
    raw = r.hget("ms:placements", model_id)
    return {p: c["state"] for p, c in (json.loads(raw) if raw else {}).items()}


def loaded(r: Any, model_id: str) -> set[str]:
    return {p for p, s in copies(r, model_id).items() if s == "loaded"}


def model_id(r: Any, alias: str = MODEL) -> str:
    v = r.hget("ms:aliases", alias)
    assert v, f"{alias} is not registered"
    return v.decode()


class TimedLoad(SteadyLoad):
    """SteadyLoad that also notes when each failure happened (monotonic seconds)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.failed_at: list[float] = []

    def _fail(self, why: str) -> None:
        self.failed_at.append(time.monotonic())
        super()._fail(why)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for `meshserve up` to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def registered(r: Any, pod: str, since: float) -> bool:
    """The pod registered (not draining) and heartbeated after `since` (unix time)."""
    raw = r.hget("ms:pods", pod)
    hb = r.zscore("ms:heartbeats", pod)
    return bool(raw) and not json.loads(raw).get("draining") and hb is not None and hb > since
