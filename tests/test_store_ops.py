"""Kind: integration (a real Valkey, from devmesh). The store's operations do what the
components rely on: a request reads back as the message written; an order's result and its
acknowledgement land together; a heartbeat says whether placement still knows the pod; commits
are followed on ms:changes; and the readers of ms:events (`describe`, the metrics) see the
loaders' results."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest

from meshserve import events
from meshserve.model import ModelSpec, Pod
from meshserve.observe import MeshStateCollector
from meshserve_testing import devmesh
from meshserve.store import keys, messages as m
from meshserve.store import ops as store_ops
from meshserve.store.state import State


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


@pytest.fixture
async def state(valkey: Any) -> AsyncIterator[State]:
    s = State.from_url(valkey.url)
    await s.r.flushall()
    try:
        yield s
    finally:
        await s.close()


def pod(pod_id: str = "pod-0") -> Pod:
    return Pod(pod_id, "127.0.0.1", 1, 2, 1 << 30, ["sklearn"])


async def test_a_request_reads_back_as_written(state: State) -> None:
    req = m.LoadRequest("a__isvc-1", "pin", 12.5, "", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    await store_ops.request_load(state.r, req)
    (eid, fields), = await state.r.xrange(keys.LOAD_REQUESTS)
    got = m.LoadRequest.decode(fields)
    assert got == req and got.trace == req.trace


async def test_an_orders_result_and_its_ack_land_together(state: State) -> None:
    await store_ops.register_pod(state, pod())
    assert await store_ops.heartbeat(state.r, "pod-0")
    spec = ModelSpec("a__isvc-1", "a", "sklearn", {"uri": "file:///a"})
    await state.commit([store_ops.order("pod-0", m.LoadOrder(spec)), store_ops.order("pod-0", m.UnloadOrder("b"))], [])
    entries = await store_ops.read_orders(state.r, "pod-0", ">", block=100)
    orders = [m.decode_order(f) for _, f in entries]
    assert orders == [m.LoadOrder(spec), m.UnloadOrder("b")]
    await store_ops.report_result(state.r, "pod-0", entries[0][0], m.LoadResult("pod-0", spec.id, True, 5, predicted=4))
    # a restarted loader re-reads from 0 only the order it had not reported
    pending = await store_ops.read_orders(state.r, "pod-0", "0", block=100)
    assert [e for e, _ in pending] == [entries[1][0]]
    (_, ev), = await state.r.xrange(keys.EVENTS)
    assert m.decode_event(ev) == m.LoadResult("pod-0", spec.id, True, 5, ts=m.decode_event(ev).ts, predicted=4)


async def test_a_heartbeat_says_when_placement_forgot_the_pod(state: State) -> None:
    assert not await store_ops.heartbeat(state.r, "pod-9")  # never registered (or withdrawn)
    await store_ops.publish_pod(state, pod("pod-9"))
    assert await store_ops.heartbeat(state.r, "pod-9")


async def test_commits_are_followed_on_the_change_stream(state: State) -> None:
    start, _ = await store_ops.last_change(state.r)
    rev = await state.register_models([ModelSpec("a__isvc-1", "a", "sklearn", {"uri": "file:///a"})])
    got = await store_ops.read_changes(state.r, start, 10)
    assert [c for _, c in got] == [m.Change(rev, m.KIND_MODEL, "a__isvc-1"), m.Change(rev, m.KIND_ALIAS, "a")]
    assert (await store_ops.last_change(state.r))[1] == rev
    assert [c for _, c in await store_ops.changes_since(state.r, got[0][0], 10)] == [got[1][1]]


async def test_describe_and_the_metrics_read_the_loaders_results(state: State) -> None:
    await store_ops.announce_registered(state.r, m.PodRegistered("pod-0", {"a": 5}))
    await state.r.xadd(keys.EVENTS, m.LoadResult("pod-0", "a", False, 0, "storage: no such file", 100.0).encode())
    await state.r.xadd(keys.EVENTS, m.LoadResult("pod-0", "a", True, 3 << 20, "", 200.0).encode())
    await state.r.xadd(keys.EVENTS, m.UnloadResult("pod-0", "a", True, 0, "", 300.0).encode())
    await store_ops.report_pod_event(state.r, m.PodEvent("runtime_restart", "pod-0", ("a",), "runtime exited 137", 250.0))
    rows = await events.recent(state, model="a")
    assert [(e["reason"], e["message"]) for e in rows] == [
        ("LoadFailed", "storage: no such file"), ("Loaded", f"loaded, {3 << 20} bytes"),
        ("RuntimeRestarted", "runtime exited 137, models: a"), ("Unloaded", "unloaded")]
    assert "Registered" in [e["reason"] for e in await events.recent(state, pod="pod-0")]  # at the time Redis took it
    tally = MeshStateCollector(state)
    await tally._tail_events("0")
    assert dict(tally.loads) == {"failed": 1, "ok": 1} and tally.unloads == 1 and tally.model_loads["a"] == 1
