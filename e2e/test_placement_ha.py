"""Issue 4, high availability: two placement processes, one leads through the lease in Redis.
kill -9 the leader while loads and evictions are under way: the other takes over within three
lease periods, no model is loaded twice, and no pod's memory is ever booked beyond capacity.

Kind: e2e/state. Real Valkey, two real `python -m meshserve_placement` processes, fake loader
agents in this process speaking the real order/event protocol (see test_placement.FakePod).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from test_placement import FakePod, spec  # the same fakes as the single-leader tests

from meshserve_testing import devmesh
from meshserve import state as st
from meshserve.model import CopyState, Pod, copies_from_json
from meshserve_placement.scheduler import QUEUED

pytestmark = pytest.mark.e2e
MB = 1 << 20
LEASE = 1.0
REPO = Path(__file__).resolve().parent.parent


def start_placement(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MESHSERVE_REDIS_URL": url,
        "MESHSERVE_HOST": "127.0.0.1",
        "MESHSERVE_LEASE_SECONDS": str(LEASE),
        "MESHSERVE_HEARTBEAT_SECONDS": "0.5",
        "MESHSERVE_HEARTBEAT_MISSES": "4",
        "MESHSERVE_ACTIVATOR_REST_PORT": str(devmesh.free_port()),
        "MESHSERVE_ACTIVATOR_GRPC_PORT": str(devmesh.free_port()),
        "MESHSERVE_PLACEMENT_METRICS_PORT": str(devmesh.free_port()),
        "MESHSERVE_MAINTAIN_SECONDS": "0.2",
    }
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "meshserve_placement"], cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT)


async def test_leader_killed_mid_churn_other_takes_over_cleanly() -> None:
    with devmesh.valkey() as v, tempfile.TemporaryDirectory(prefix="ms-ha-") as tmp:
        state = st.State.from_url(v.url)
        pods = [FakePod(Pod(f"pod-{i}", "127.0.0.1", devmesh.free_port(), 0, 100 * MB, ["sklearn"], max_loading=2), state, load_seconds=0.15) for i in range(2)]
        fakes = [asyncio.create_task(p.run()) for p in pods]
        procs: list[subprocess.Popen[bytes]] = []
        over: list[str] = []

        async def watch_bookings() -> None:
            # Sample every placement. Booked bytes (loaded + loads decided) and held bytes (loaded +
            # loads sent to the pod + copies not yet unloaded) must both stay within capacity.
            while True:
                booked: Counter[str] = Counter()
                held: Counter[str] = Counter()
                for m, raw in (await state.r.hgetall(st.PLACEMENTS)).items():
                    for p, c in copies_from_json(raw).items():
                        if c.state in (CopyState.LOADED, CopyState.LOADING):
                            booked[p] += c.size
                        if c.state in (CopyState.LOADED, CopyState.UNLOADING) or (c.state == CopyState.LOADING and c.reason != QUEUED):
                            held[p] += c.size
                over.extend(f"{p}: booked {b} > {100 * MB}" for p, b in booked.items() if b > 100 * MB)
                over.extend(f"{p}: held {b} > {100 * MB}" for p, b in held.items() if b > 100 * MB)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_bookings())
        try:
            log = Path(tmp) / "placement.log"
            procs.append(start_placement(v.url, log))
            await _until(lambda: state.r.get(st.LEASE), 15, "a first leader")
            procs.append(start_placement(v.url, log))
            await asyncio.sleep(1.0)
            first = (await state.r.get(st.LEASE)).decode()
            models = [spec(f"m{i:02d}", 20 * MB) for i in range(24)]  # 480 MB of models on 200 MB of pods
            await state.register_models(models)
            for m in models[:12]:
                await state.r.xadd(st.LOAD_REQUESTS, {"model": m.id})
                await asyncio.sleep(0.05)
            # Find and kill -9 the leader while its loads are in flight.
            leader_proc = await _leader_proc(procs, first)
            leader_proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await _until(lambda: _leader_other_than(state, first), 3 * LEASE + 1, "a new leader")
            takeover = time.monotonic() - killed
            assert takeover <= 3 * LEASE, f"takeover took {takeover:.2f}s"
            for m in models[12:]:
                await state.r.xadd(st.LOAD_REQUESTS, {"model": m.id})
                await asyncio.sleep(0.05)

            resent = time.monotonic()

            async def settled() -> bool:
                nonlocal resent
                placements = await state.r.hgetall(st.PLACEMENTS)
                if time.monotonic() - resent > 1.0:
                    # A client whose request got a 503 (every pod busy loading) tries again.
                    resent = time.monotonic()
                    asked = {m for p in pods for op, m in p.orders if op == "load"}
                    for m in models:
                        if m.id not in asked and not any(c.state == CopyState.LOADING for c in copies_from_json(placements.get(m.id.encode())).values()):
                            await state.r.xadd(st.LOAD_REQUESTS, {"model": m.id})
                busy = any(c.state in (CopyState.LOADING, CopyState.UNLOADING) for raw in placements.values() for c in copies_from_json(raw).values())
                return not busy and _all_requested_loaded(pods, models)

            try:
                await _until(settled, 20, "all loads done")
            except AssertionError as e:
                placements = {k.decode(): v.decode() for k, v in (await state.r.hgetall(st.PLACEMENTS)).items()}
                orders = [p.orders for p in pods]
                raise AssertionError(f"{e}\nplacements={placements}\norders={orders}\n{log.read_text()[-4000:]}") from None
            loads = Counter(m for p in pods for op, m in p.orders if op == "load")
            dup = {m: n for m, n in loads.items() if n > 1}
            assert not dup, f"models loaded more than once: {dup}\n{log.read_text()[-3000:]}"
            assert set(loads) == {m.id for m in models}
            assert not over, over[:5]
            # Memory the pods really hold matches what placement booked.
            for p in pods:
                assert sum(s["size"] for s in p.held.values()) <= 100 * MB
            print(f"takeover after kill -9: {takeover:.2f}s (lease {LEASE}s)")
        finally:
            watcher.cancel()
            for t in fakes:
                t.cancel()
            await asyncio.gather(watcher, *fakes, return_exceptions=True)
            for pr in procs:
                if pr.poll() is None:
                    pr.terminate()
                    try:
                        pr.wait(10)
                    except subprocess.TimeoutExpired:
                        pr.kill()
                        pr.wait(5)
            await state.close()


def _all_requested_loaded(pods: list[FakePod], models: list) -> bool:  # type: ignore[type-arg]
    loaded = {m for p in pods for op, m in p.orders if op == "load"}
    return loaded >= {m.id for m in models}


async def _leader_other_than(state: st.State, old: str) -> bool:
    cur = await state.r.get(st.LEASE)
    return cur is not None and cur.decode() != old


async def _leader_proc(procs: list[subprocess.Popen[bytes]], leader_id: str) -> subprocess.Popen[bytes]:
    # The first process took the lease while it was alone, and a leader renews it, so it still leads.
    return procs[0]


async def _until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")
