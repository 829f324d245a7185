"""The operations components call on the store: the only place outside `State` that spells a
Redis command. Two kinds:

- command builders (`set_model`, `order`, `request`, ...) return one command list for
  `State.commit`, so a caller composes an atomic write without spelling the command;
- async operations (`request_load`, `read_orders`, `report_result`, ...) do one round trip (or
  one transaction) on a redis-py client.

Which process may call which writer is in docs/design/state.md ("written by").
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Iterable, Mapping

import redis.asyncio as aioredis

from meshserve.model import Copy, ModelSpec, Pod, copies_to_json
from meshserve.store import keys as k
from meshserve.store.messages import (
    KIND_POD, Change, Event, GatewaySync, LoadRequest, Order, PodEvent, PodRegistered, _Result, decode_event, gateways_caught_up, SYNCED_STALE_SECONDS,
)
from meshserve.store.state import State

Cmd = list[Any]
Entry = tuple[bytes, dict[bytes, bytes]]


def _flat(fields: Mapping[str, str]) -> list[str]:
    return [x for kv in fields.items() for x in kv]


def _j(d: Any) -> str:
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


# --- command builders, for State.commit -----------------------------------------------------------


def set_model(spec: ModelSpec) -> Cmd:
    return ["HSET", k.MODELS, spec.id, spec.to_json()]


def set_alias(alias: str, model_id: str) -> Cmd:
    return ["HSET", k.ALIASES, alias, model_id]


def set_transition(alias: str, record: Mapping[str, Any]) -> Cmd:
    return ["HSET", k.TRANSITIONS, alias, _j(record)]


def del_transition(alias: str) -> Cmd:
    return ["HDEL", k.TRANSITIONS, alias]


def set_rule(name: str, doc: Mapping[str, Any]) -> Cmd:
    return ["HSET", k.RULES, name, _j(doc)]


def set_rule_status(name: str, status: Mapping[str, Any]) -> Cmd:
    return ["HSET", k.RULE_STATUS, name, _j(status)]


def del_rule(name: str) -> list[Cmd]:
    return [["HDEL", k.RULES, name], ["HDEL", k.RULE_STATUS, name]]


def set_pod(pod: Pod) -> Cmd:
    return ["HSET", k.PODS, pod.id, pod.to_json()]


def request(req: LoadRequest) -> Cmd:
    """A leader request written atomically with other state (rollout's withdraw and retire)."""
    return ["XADD", k.LOAD_REQUESTS, "MAXLEN", "~", k.STREAM_MAXLEN, "*", *_flat(req.encode())]


# The placement leader's writes: only its module may call these (tests/test_one_writer.py).


def over_field(adapter: str, pod: str) -> str:
    """keys.PLACEMENT_OVER's field for an adapter's copy on a pod."""
    return f"{adapter}|{pod}"


def parse_over_field(field: bytes | str) -> tuple[str, str]:
    """(adapter, pod) of a keys.PLACEMENT_OVER field."""
    adapter, _, pod = (field.decode() if isinstance(field, bytes) else field).rpartition("|")
    return adapter, pod


def set_over(adapter: str, bases: Mapping[str, str]) -> Cmd:
    """The adapter's copies on these pods are over these (superseded) bases."""
    return ["HSET", k.PLACEMENT_OVER, *(x for pod, base in sorted(bases.items()) for x in (over_field(adapter, pod), base))]


def drop_over(adapter: str, pods: Iterable[str]) -> Cmd:
    return ["HDEL", k.PLACEMENT_OVER, *(over_field(adapter, pod) for pod in pods)]


async def read_over(r: aioredis.Redis) -> list[tuple[str, str, str]]:
    """(adapter, pod, base) for every adapter copy over a superseded base."""
    return [(*parse_over_field(f), b.decode()) for f, b in (await r.hgetall(k.PLACEMENT_OVER)).items()]


def set_copies(model_id: str, copies: Mapping[str, Copy]) -> Cmd:
    return ["HSET", k.PLACEMENTS, model_id, copies_to_json(dict(copies))] if copies else ["HDEL", k.PLACEMENTS, model_id]


def order(pod_id: str, o: Order) -> Cmd:
    return ["XADD", k.orders_key(pod_id), "*", *_flat(o.encode())]


def pin(model_id: str, now: float) -> Cmd:
    return ["HSET", k.PINS, model_id, now]


def unpin(model_id: str) -> Cmd:
    return ["HDEL", k.PINS, model_id]


def enqueue(pod_id: str, model_id: str, priority: float) -> Cmd:
    return ["ZADD", k.loadq_key(pod_id), priority, model_id]


def dequeue(pod_id: str, model_id: str) -> Cmd:
    return ["ZREM", k.loadq_key(pod_id), model_id]


def exclude(model_id: str, pod_id: str, until: float) -> Cmd:
    return ["HSET", k.EXCLUDED, k.excluded_field(model_id, pod_id), until]


def ack_entries(stream: str, group: str, eids: list[bytes]) -> Cmd:
    """Stream entries handled, acknowledged in the same commit as what handling them wrote."""
    return ["XACK", stream, group, *(e.decode() if isinstance(e, bytes) else e for e in eids)]


def set_decision(model_id: str, record: Mapping[str, Any]) -> Cmd:
    return ["HSET", k.DECISIONS, model_id, json.dumps(record, separators=(",", ":"))]


def withdraw_pod(pod_id: str, record: Mapping[str, Any]) -> list[Cmd]:
    return [["HDEL", k.PODS, pod_id], ["ZREM", k.HEARTBEATS, pod_id], ["DEL", k.loadq_key(pod_id)], ["HDEL", k.PAUSED, pod_id],
            ["HSET", k.WITHDRAWN, pod_id, json.dumps(record, separators=(",", ":"))]]


def set_paused(pod_id: str, why: str) -> Cmd:
    return ["HSET", k.PAUSED, pod_id, why]


def clear_paused(pod_ids: Iterable[str]) -> Cmd:
    return ["HDEL", k.PAUSED, *pod_ids]


async def read_paused(r: aioredis.Redis) -> dict[str, str]:
    """Pod id -> why, for the pods placement judged paused (keys.PAUSED)."""
    return {p.decode(): v.decode() for p, v in (await r.hgetall(k.PAUSED)).items()}


def forget_withdrawn(pod_id: str) -> Cmd:
    return ["HDEL", k.WITHDRAWN, pod_id]


# --- streams: requests, orders, results ----------------------------------------------------------


def queue_request(pipe: Any, req: LoadRequest) -> None:
    """Add a leader request to a pipeline (one round trip with the caller's reads)."""
    pipe.xadd(k.LOAD_REQUESTS, req.encode(), maxlen=k.STREAM_MAXLEN, approximate=True)


async def request_load(r: aioredis.Redis, req: LoadRequest) -> None:
    """Ask the placement leader (load, pin, unpin, withdraw, retire)."""
    await r.xadd(k.LOAD_REQUESTS, req.encode(), maxlen=k.STREAM_MAXLEN, approximate=True)


async def ensure_group(r: aioredis.Redis, stream: str, group: str) -> None:
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except aioredis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


async def read_group(r: aioredis.Redis, stream: str, group: str, consumer: str, cursor: str, count: int, block: int) -> list[Entry]:
    """Entries of `stream` for this consumer: its pending ones from cursor "0", new ones from ">"."""
    resp = await r.xreadgroup(group, consumer, {stream: cursor}, count=count, block=block)
    return resp[0][1] if resp else []


async def read_orders(r: aioredis.Redis, pod_id: str, cursor: str, count: int = 16, block: int = 1000) -> list[Entry]:
    """A pod's orders (decode each with messages.decode_order)."""
    return await read_group(r, k.orders_key(pod_id), k.ORDERS_GROUP, pod_id, cursor, count, block)


async def ack(r: aioredis.Redis, stream: str, group: str, eid: bytes) -> None:
    await r.xack(stream, group, eid)


async def report_result(r: aioredis.Redis, pod_id: str, eid: bytes, result: _Result) -> None:
    """An order's result to the leader, and the order acknowledged and gone, in one transaction:
    a loader that restarts carries out exactly the orders it had not reported."""
    async with r.pipeline(transaction=True) as p:
        p.xadd(k.EVENTS, result.encode(), maxlen=k.STREAM_MAXLEN, approximate=True)
        p.xack(k.orders_key(pod_id), k.ORDERS_GROUP, eid)
        p.xdel(k.orders_key(pod_id), eid)
        await p.execute()


async def drop_order(r: aioredis.Redis, pod_id: str, eid: bytes, why: PodEvent) -> None:
    """An order not carried out, acknowledged, with the pod event saying why."""
    async with r.pipeline(transaction=True) as p:
        p.xadd(k.POD_EVENTS, why.encode(), maxlen=k.STREAM_MAXLEN, approximate=True)
        p.xack(k.orders_key(pod_id), k.ORDERS_GROUP, eid)
        p.xdel(k.orders_key(pod_id), eid)
        await p.execute()


async def report_pod_event(r: aioredis.Redis, ev: PodEvent) -> None:
    await r.xadd(k.POD_EVENTS, ev.encode(), maxlen=k.STREAM_MAXLEN, approximate=True)


async def register_pod(state: State, pod: Pod) -> None:
    """A loader starting: its orders' group, a first heartbeat, and the pod (a routing change)."""
    await ensure_group(state.r, k.orders_key(pod.id), k.ORDERS_GROUP)
    await state.r.zadd(k.HEARTBEATS, {pod.id: time.time()})
    await publish_pod(state, pod)


async def publish_pod(state: State, pod: Pod) -> int:
    return await state.commit([set_pod(pod)], [(KIND_POD, pod.id)])


async def announce_registered(r: aioredis.Redis, reg: PodRegistered) -> None:
    await r.xadd(k.EVENTS, reg.encode(), maxlen=k.STREAM_MAXLEN, approximate=True)


async def heartbeat(r: aioredis.Redis, pod_id: str, now: float | None = None) -> bool:
    """One round trip: the heartbeat, and whether placement still knows the pod."""
    async with r.pipeline(transaction=False) as p:
        p.zadd(k.HEARTBEATS, {pod_id: time.time() if now is None else now}).hexists(k.PODS, pod_id)
        _, known = await p.execute()
    return bool(known)


async def forget_heartbeats(r: aioredis.Redis, pod_ids: list[str]) -> None:
    """Pods going away (the controller saw them deleted): without a heartbeat the placement
    leader withdraws them on its next check, through its own fenced commit."""
    if pod_ids:
        await r.zrem(k.HEARTBEATS, *pod_ids)


async def mark_used(r: aioredis.Redis, used: Mapping[str, float]) -> None:
    """Request recency: only ever moves forward."""
    if used:
        await r.zadd(k.LAST_USED, dict(used), gt=True)


async def report_synced(r: aioredis.Redis, put: Mapping[str, GatewaySync], gone: list[str]) -> None:
    """An xDS server's gateway streams: the revision each one's ACKed routes reflect
    (keys.XDS_SYNCED), and the streams that ended."""
    async with r.pipeline(transaction=False) as p:
        if put:
            p.hset(k.XDS_SYNCED, mapping={f: g.encode() for f, g in put.items()})
        if gone:
            p.hdel(k.XDS_SYNCED, *gone)
        await p.execute()


async def wait_for_gateways(r: aioredis.Redis, timeout: float, poll: float = 0.02) -> bool | None:
    """Wait until every live gateway applied the routes as of the current revision. None when
    no gateway is known (none connected, or an xDS server that does not report): nothing to
    wait for; False when `timeout` passed first."""
    rev, ok = await gateways_at(r, None)
    if ok:
        return True
    now = time.time()
    if not any(now - GatewaySync.decode(v).at <= SYNCED_STALE_SECONDS for v in (await r.hgetall(k.XDS_SYNCED)).values()):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(poll)
        if (await gateways_at(r, rev))[1]:
            return True
    return False


async def gateways_at(r: aioredis.Redis, rev: int | None) -> tuple[int, bool]:
    """For an unload: the revision to wait for (`rev`, or the current one when None) and whether
    every live gateway applied it (messages.gateways_caught_up), in one round trip."""
    async with r.pipeline(transaction=False) as p:
        if rev is None:
            p.get(k.REV)
        p.hgetall(k.XDS_SYNCED)
        got = await p.execute()
    if rev is None:
        rev = int(got[0] or 0)
    return rev, gateways_caught_up(got[-1], rev, time.time())


async def set_progress(r: aioredis.Redis, model_id: str, pod_id: str, doc: str, ttl: float) -> None:
    await r.set(k.progress_key(model_id, pod_id), doc, px=int(ttl * 1000))


async def recent(r: aioredis.Redis, stream: str, count: int) -> list[Entry]:
    """The newest `count` entries of a stream, newest first."""
    return await r.xrevrange(stream, count=count)


async def read_events(r: aioredis.Redis, after: bytes | str, count: int) -> list[tuple[bytes, Event | None]]:
    """ms:events entries after id `after` ("$": only new ones); None for an entry nobody reads."""
    resp = await r.xread({k.EVENTS: after}, count=count)
    return [(eid, decode_event(f)) for eid, f in (resp[0][1] if resp else [])]


async def read_changes(r: aioredis.Redis, after: bytes | str, count: int, block: int | None = None) -> list[tuple[bytes, Change]]:
    """ms:changes entries after id `after` (waiting up to `block` ms for one when given)."""
    resp = await r.xread({k.CHANGES: after}, count=count, block=block)
    return [(eid, Change.decode(f)) for eid, f in (resp[0][1] if resp else [])]


async def read_changes_and_results(r: aioredis.Redis, after_changes: bytes | str, after_events: bytes | str, count: int,
                                   block: int | None = None) -> tuple[list[tuple[bytes, Change]], list[tuple[bytes, Event | None]]]:
    """ms:changes and ms:events entries after the two ids, in one XREAD (waiting up to `block`
    ms for either): the activator wakes on a load's result as the loader reports it, not only
    once the leader has committed it."""
    resp = await r.xread({k.CHANGES: after_changes, k.EVENTS: after_events}, count=count, block=block)
    by = {(name.decode() if isinstance(name, bytes) else name): entries for name, entries in (resp or [])}
    return ([(eid, Change.decode(f)) for eid, f in by.get(k.CHANGES, [])],
            [(eid, decode_event(f)) for eid, f in by.get(k.EVENTS, [])])


async def changes_since(r: aioredis.Redis, after: bytes | str, count: int) -> list[tuple[bytes, Change]]:
    """Like read_changes, never waiting (XRANGE from just after `after`)."""
    after = after.decode() if isinstance(after, bytes) else after
    return [(eid, Change.decode(f)) for eid, f in await r.xrange(k.CHANGES, min="(" + after, count=count)]


def queue_last_change_id(pipe: Any) -> None:
    """Add to a pipeline the read of the newest ms:changes entry; its reply gives the id
    through `last_change_id`."""
    pipe.xrevrange(k.CHANGES, count=1)


def last_change_id(reply: list[Entry]) -> str:
    """The id a `queue_last_change_id` read gave, "0-0" when the stream is empty."""
    return reply[0][0].decode() if reply else "0-0"


async def last_change(r: aioredis.Redis) -> tuple[bytes, int]:
    """The newest ms:changes entry's id and revision, (b"0-0", 0) when there is none."""
    last = await r.xrevrange(k.CHANGES, count=1)
    return (last[0][0], Change.decode(last[0][1]).rev) if last else (b"0-0", 0)


async def clear_transformers(r: aioredis.Redis) -> None:
    await r.delete(k.TRANSFORMERS)


async def set_transformer(r: aioredis.Redis, name: str, record: str) -> None:
    await r.hset(k.TRANSFORMERS, name, record)


async def transformers(r: aioredis.Redis) -> dict[bytes, bytes]:
    return await r.hgetall(k.TRANSFORMERS)
