"""Issue 6: InferenceService version moves through the real Envoy, under continuous load.

Kind: e2e. One `meshserve up` with a tiny `string` model whose spec changes: the new version
loads before traffic moves, the old one drains and unloads, a failed load leaves traffic where
it was (TRANSITION_FAILED with the reason), and canaryTrafficPercent splits old/new.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from meshserve_testing import devmesh
from meshserve.store import State
from meshserve.cli import cli
from meshserve.model import CopyState
from meshserve.rules import store

from meshserve_testing.xds_harness import gateway_route_dump, scope_targets
from test_traffic_rules import Client, fire, isvc  # e2e/ is on sys.path under pytest (rootdir conftest)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devmesh.Mesh]:
    cfg = tmp_path_factory.mktemp("rollout-config")
    (cfg / "move.yaml").write_text(isvc("tr-move", "v1.txt"))
    with devmesh.mesh(config_dir=cfg) as m:
        d = m.data_dir / "pvc" / "strings"
        d.mkdir(parents=True, exist_ok=True)
        for v in ("v1", "v2", "v3"):
            (d / f"{v}.txt").write_text(v)
        yield m


def apply_file(m: devmesh.Mesh, f: Path) -> str:
    res = CliRunner().invoke(cli, ["apply", "-f", str(f)], env={"MESHSERVE_REDIS_URL": m.redis_url})
    assert res.exit_code == 0, res.output
    return res.output


async def _read(url: str):  # type: ignore[no-untyped-def]
    s = State.from_url(url)
    try:
        _, _, transitions = await store.read_all(s)
        snap = await s.snapshot()
        return transitions, snap
    finally:
        await s.close()


def read(m: devmesh.Mesh):  # type: ignore[no-untyped-def]
    return asyncio.run(_read(m.redis_url))


class Load:
    """Threads calling the alias without pause; every answer and failure is kept."""

    def __init__(self, m: devmesh.Mesh, threads: int = 4):
        self.m, self.stop = m, threading.Event()
        self.answers: list[tuple[float, str]] = []
        self.failures: list[tuple[int, str]] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        c = Client(self.m)
        while not self.stop.is_set():
            code, who = c.infer("tr-move", full=True)
            if code == 200:
                self.answers.append((time.monotonic(), who))
            else:
                self.failures.append((code, who))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def wait_phase(m: devmesh.Mesh, alias: str, phases: set[str], timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        transitions, snap = read(m)
        t = transitions.get(alias)
        if t is not None and t.phase in phases:
            return t, snap
        time.sleep(0.2)
    raise AssertionError(f"{alias} never reached {phases}: {transitions.get(alias)}\n{m.log()[-3000:]}")


def test_version_move_under_load_has_zero_failed_requests(rmesh: devmesh.Mesh, tmp_path: Path) -> None:
    # Two copies of v1 (minCopies; same predictor, same version), so the move must bring v2 to
    # two copies before moving. Applied now, not at startup: the model files exist now.
    f = tmp_path / "move.yaml"
    f.write_text(isvc("tr-move", "v1.txt").replace("    serving.kserve.io/deploymentMode: ModelMesh\n",
                                                  "    serving.kserve.io/deploymentMode: ModelMesh\n    meshserve.io/minCopies: \"2\"\n"))
    apply_file(rmesh, f)
    c = Client(rmesh)
    assert c.infer("tr-move") == (200, "tr-move")
    _, snap = read(rmesh)
    v1 = snap.aliases["tr-move"]
    devmesh.wait_until(lambda: sum(x.state == CopyState.LOADED for x in read(rmesh)[1].placements.get(v1, {}).values()) == 2, 30, "two copies of v1")
    f.write_text(isvc("tr-move", "v2.txt"))
    with Load(rmesh) as load:
        time.sleep(0.5)
        out = apply_file(rmesh, f)
        assert "moving" in out, out
        t, snap = wait_phase(rmesh, "tr-move", {"Done", "TRANSITION_FAILED"})
        time.sleep(1.0)
    assert t.phase == "Done", t
    assert snap.aliases["tr-move"] == t.new != v1
    assert t.copies == 2 and t.extra["loadedAtMove"] == 2, t  # as many copies as v1 before traffic moved
    assert snap.models[t.new].min_copies == 0  # the move's boost is gone again
    assert not load.failures, load.failures[:5]
    n = len(load.answers)
    print(f"\nversion move under load: {n} requests, 0 failed")
    assert n > 200
    # Once moved, the alias means the new version only, while the old one may still be loaded
    # beside it: the runtime there holds both under one alias, so the gateway names the new id
    # (docs/design/routing.md "Shared routes").
    counts, failures = fire(rmesh, "tr-move", 200, full=True)
    assert not failures and set(counts) == {t.new}, counts
    # The old version is gone from the pods (unload ordered after the drain).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, snap = read(rmesh)
        if not any(c.state == CopyState.LOADED for c in snap.placements.get(v1, {}).values()):
            break
        time.sleep(0.2)
    assert not any(c.state == CopyState.LOADED for c in snap.placements.get(v1, {}).values()), snap.placements.get(v1)
    # v1 gone, the built-in runtimes resolve the alias themselves: its scope names the pods'
    # shared RouteConfiguration, and requests by alias still reach v2.
    devmesh.wait_until(lambda: any(rc.startswith("pods/") for rc in scope_targets(gateway_route_dump(rmesh.admin), "tr-move")), 20,
                       "tr-move on its pods' shared routes")
    counts, failures = fire(rmesh, "tr-move", 50, full=True)
    assert not failures and set(counts) == {t.new}, counts


def test_failed_load_keeps_traffic_and_reports_transition_failed(rmesh: devmesh.Mesh, tmp_path: Path) -> None:
    _, snap = read(rmesh)
    serving = snap.aliases["tr-move"]
    f = tmp_path / "move.yaml"
    f.write_text(isvc("tr-move", "missing.txt"))
    with Load(rmesh, threads=2) as load:
        apply_file(rmesh, f)
        t, snap = wait_phase(rmesh, "tr-move", {"TRANSITION_FAILED", "Done"})
    assert t.phase == "TRANSITION_FAILED" and "missing.txt" in t.reason, t
    assert snap.aliases["tr-move"] == serving
    assert not load.failures, load.failures[:5]
    res = CliRunner().invoke(cli, ["get", "rules"], env={"MESHSERVE_REDIS_URL": rmesh.redis_url, "COLUMNS": "250"})
    assert "TRANSITION_FAILED" in res.output, res.output


def test_canary_traffic_percent_splits_then_promote_moves_all(rmesh: devmesh.Mesh, tmp_path: Path) -> None:
    _, snap = read(rmesh)
    stable = snap.aliases["tr-move"]
    f = tmp_path / "move.yaml"
    f.write_text(isvc("tr-move", "v3.txt").replace("    model:\n", "    canaryTrafficPercent: 30\n    model:\n", 1))
    apply_file(rmesh, f)
    t, _ = wait_phase(rmesh, "tr-move", {"Canary", "TRANSITION_FAILED"})
    assert t.phase == "Canary" and t.old == stable, t
    c = Client(rmesh)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and c.infer("tr-move", full=True)[1] != t.new:
        pass  # until the split reached the gateway
    counts, failures = fire(rmesh, "tr-move", 1000, full=True)
    assert not failures and set(counts) == {stable, t.new}, counts
    share = counts[t.new] / 10
    print(f"\ncanaryTrafficPercent 30: new version got {share:.1f}% of 1000")
    assert 24 <= share <= 36
    with Load(rmesh, threads=2) as load:
        res = CliRunner().invoke(cli, ["promote", "tr-move"], env={"MESHSERVE_REDIS_URL": rmesh.redis_url})
        assert res.exit_code == 0, res.output
        t, snap = wait_phase(rmesh, "tr-move", {"Done"})
    assert snap.aliases["tr-move"] == t.new
    assert not load.failures, load.failures[:5]


def test_rollback_of_a_finished_move_returns_to_the_previous_version(rmesh: devmesh.Mesh) -> None:
    transitions, snap = read(rmesh)
    t = transitions["tr-move"]
    assert t.phase == "Done" and snap.aliases["tr-move"] == t.new
    with Load(rmesh, threads=2) as load:
        time.sleep(0.3)
        res = CliRunner().invoke(cli, ["rollback", "tr-move"], env={"MESHSERVE_REDIS_URL": rmesh.redis_url})
        assert res.exit_code == 0, res.output
        # The previous version was unloaded: it loads again on demand, requests wait, none fail.
        devmesh.wait_until(lambda: any(who == t.old for _, who in load.answers[-20:]), 30, "answers from the previous version")
    transitions, snap = read(rmesh)
    assert snap.aliases["tr-move"] == t.old and transitions["tr-move"].phase == "RolledBack"
    assert not load.failures, (load.failures[:5], rmesh.log()[-6000:])
