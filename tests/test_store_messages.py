"""Kind: unit (pure; no Redis). Every stream message meshserve writes has one encoder and one
decoder (meshserve/store/messages.py): each round-trips, decodes from bytes as redis-py returns
it, and reads the exact fields the writers produced before the store owned them (issue 15)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as s

from meshserve.model import ModelSpec
from meshserve.store import keys, messages as m, ops

text = s.text(s.characters(blacklist_categories=("Cs",)), max_size=20)
ids = s.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20)
ts = s.floats(min_value=0, max_value=4e9, allow_nan=False)
trace = s.one_of(s.just({}), s.just({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}))
specs = s.builds(ModelSpec, id=ids, alias=ids, format=s.sampled_from(["sklearn", "onnx"]), storage=s.just({"uri": "file:///m"}),
                 min_copies=s.integers(0, 5), pinned=s.booleans(), size_hint=s.integers(0, 1 << 40))


def as_redis(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


def same(a: object, b: object) -> None:
    assert a == b and getattr(a, "trace", None) == getattr(b, "trace", None)


@given(ids, s.sampled_from(m.LOAD_OPS), ts, text, trace)
def test_load_request_round_trip(model: str, op: str, t: float, why: str, tr: dict) -> None:
    req = m.LoadRequest(model, op, t, why, tr)
    same(m.LoadRequest.decode(as_redis(req.encode())), req)


@given(specs, trace)
def test_load_order_round_trip(spec: ModelSpec, tr: dict) -> None:
    o = m.LoadOrder(spec, tr)
    same(m.decode_order(as_redis(o.encode())), o)


@given(ids, trace)
def test_unload_order_round_trip(model: str, tr: dict) -> None:
    o = m.UnloadOrder(model, tr)
    same(m.decode_order(as_redis(o.encode())), o)


@given(ids, ids, s.booleans(), s.integers(0, 1 << 40), text, ts, trace, s.one_of(s.none(), s.integers(0, 1 << 40)))
def test_results_round_trip(pod: str, model: str, ok: bool, size: int, reason: str, t: float, tr: dict, predicted: int | None) -> None:
    for r in (m.LoadResult(pod, model, ok, size, reason, t, tr, predicted), m.UnloadResult(pod, model, ok, size, reason, t, tr)):
        same(m.decode_event(as_redis(r.encode())), r)


@given(ids, s.dictionaries(ids, s.integers(0, 1 << 40), max_size=5))
def test_pod_registered_round_trip(pod: str, sizes: dict) -> None:
    reg = m.PodRegistered(pod, sizes)
    assert m.decode_event(as_redis(reg.encode())) == reg


@given(s.sampled_from(m.POD_EVENT_OPS), ids, s.lists(ids, max_size=4).map(tuple), text, ts)
def test_pod_event_round_trip(op: str, pod: str, models: tuple, reason: str, t: float) -> None:
    ev = m.PodEvent(op, pod, models, reason, t)
    assert m.PodEvent.decode(as_redis(ev.encode())) == ev


@given(s.integers(0, 1 << 50), s.sampled_from([m.KIND_MODEL, m.KIND_POD, m.KIND_PLACEMENT, m.KIND_ALL]), ids)
def test_change_round_trip(rev: int, kind: str, id_: str) -> None:
    c = m.Change(rev, kind, id_)
    assert m.Change.decode(as_redis(c.encode())) == c


@given(s.sampled_from(m.PROGRESS_PHASES), s.integers(0, 1 << 40), s.integers(0, 1 << 40), ts, ts, text)
def test_progress_round_trip(phase: str, done: int, total: int, started: float, updated: float, reason: str) -> None:
    p = m.Progress(phase, done, total, started, updated, reason)
    assert m.Progress.decode(p.encode().encode()) == p


# The exact fields the writers produced before the store owned them.


def test_reads_the_activators_load_request() -> None:
    raw = {b"model": b"m1", b"op": b"load", b"ts": b"1796186968.480091", b"traceparent": b"00-ab-cd-01"}
    req = m.LoadRequest.decode(raw)
    assert (req.model, req.op, req.ts, req.trace) == ("m1", "load", 1796186968.480091, {"traceparent": "00-ab-cd-01"})
    assert m.LoadRequest("m1", "load", 1796186968.480091, trace={"traceparent": "00-ab-cd-01"}).encode() == {k.decode(): v.decode() for k, v in raw.items()}


def test_reads_a_request_without_op_as_a_load() -> None:
    assert m.LoadRequest.decode({b"model": b"m1", b"ts": b"1"}).op == "load"


def test_rollouts_retire_command_is_the_one_it_wrote() -> None:
    req = m.LoadRequest("old", "retire", 12.5, "superseded by new")
    assert ops.request(req) == ["XADD", keys.LOAD_REQUESTS, "MAXLEN", "~", 100_000, "*",
                                "model", "old", "op", "retire", "ts", "12.5", "why", "superseded by new"]


def test_orders_are_the_fields_the_scheduler_wrote() -> None:
    spec = ModelSpec("a__isvc-1", "a", "sklearn", {"uri": "file:///a"})
    assert ops.order("pod-0", m.LoadOrder(spec, {"traceparent": "t"})) == [
        "XADD", "ms:orders:pod-0", "*", "op", "load", "model", spec.id, "spec", spec.to_json(), "traceparent", "t"]
    assert ops.order("pod-0", m.UnloadOrder("v")) == ["XADD", "ms:orders:pod-0", "*", "op", "unload", "model", "v"]


def test_reads_the_loaders_results() -> None:
    load = {b"pod": b"p", b"model": b"a", b"op": b"load", b"ok": b"1", b"size": b"3145728", b"reason": b"",
            b"predicted": b"3000000", b"ts": b"1700000000.25"}
    got = m.decode_event(load)
    assert got == m.LoadResult("p", "a", True, 3 << 20, "", 1700000000.25, predicted=3000000)
    assert as_redis(got.encode()) == load
    unload = {b"pod": b"p", b"model": b"a", b"op": b"unload", b"ok": b"0", b"size": b"0", b"reason": b"runtime: gone", b"ts": b"5.0"}
    got = m.decode_event(unload)
    assert got == m.UnloadResult("p", "a", False, 0, "runtime: gone", 5.0)
    assert as_redis(got.encode()) == unload
    # e2e's stand-in loader writes no ts
    assert m.decode_event({b"pod": b"p", b"model": b"a", b"op": b"load", b"ok": b"1", b"size": b"5", b"reason": b""}).size == 5


def test_reads_the_loaders_registration() -> None:
    raw = {b"op": b"register", b"pod": b"p", b"models": json.dumps(["a", "b"]).encode(), b"sizes": json.dumps({"a": 5, "b": 7}).encode()}
    reg = m.decode_event(raw)
    assert reg == m.PodRegistered("p", {"a": 5, "b": 7}) and reg.models == ["a", "b"]
    assert as_redis(reg.encode()) == raw


def test_reads_the_loaders_pod_events() -> None:
    raw = {b"op": b"runtime_restart", b"pod": b"p", b"models": b'["a"]', b"reason": b"runtime exited 137", b"ts": b"10.5"}
    ev = m.PodEvent.decode(raw)
    assert ev == m.PodEvent("runtime_restart", "p", ("a",), "runtime exited 137", 10.5)
    assert as_redis(ev.encode()) == raw
    drain = {b"op": b"drain", b"pod": b"p", b"models": b"[]", b"ts": b"1.0"}
    assert as_redis(m.PodEvent.decode(drain).encode()) == drain


def test_reads_the_commits_change_entries() -> None:
    assert m.Change.decode({b"rev": b"42", b"kind": b"placement", b"id": b"a"}) == m.Change(42, "placement", "a")


def test_an_unknown_order_is_an_error_and_an_unknown_event_is_skipped() -> None:
    try:
        m.decode_order({b"op": b"explode", b"model": b"a"})
    except ValueError:
        pass
    else:
        raise AssertionError("an unknown order decoded")
    assert m.decode_event({b"op": b"explode"}) is None
    assert m.decode_event({b"op": b"load"}) is None  # unreadable: no pod or model


def test_gateways_caught_up_needs_every_live_gateway_at_the_revision() -> None:
    """Kind: unit (pure). An unload waits until every gateway known to be connected applied the
    route withdrawal's revision; an entry its xDS server stopped refreshing says nothing, and
    with no gateway known at all the loader keeps its fixed grace (False)."""
    assert m.GatewaySync.decode(m.GatewaySync(42, 1000.25).encode()) == m.GatewaySync(42, 1000.25)
    synced = {b"gw-a/1": m.GatewaySync(10, 1000.0).encode().encode(), "gw-b/2": m.GatewaySync(9, 1000.0).encode()}
    assert not m.gateways_caught_up(synced, 10, now=1000.5)  # gw-b is behind
    synced["gw-b/2"] = m.GatewaySync(11, 1000.4).encode()
    assert m.gateways_caught_up(synced, 10, now=1000.5)
    # gw-a's server went away without removing it: stale, ignored once past the limit.
    synced["gw-a/1"] = m.GatewaySync(3, 1000.0).encode()
    assert not m.gateways_caught_up(synced, 10, now=1000.5)
    assert m.gateways_caught_up(synced, 10, now=1000.0 + m.SYNCED_STALE_SECONDS + 0.1)
    assert not m.gateways_caught_up({}, 10, now=1000.0)
