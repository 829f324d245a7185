"""The one atomic way to change routing state, and reads of it (keys: meshserve/store/keys.py).

Documented in docs/design/state.md. Every change that affects routing goes through `commit`,
a Lua script that applies the writes, bumps `ms:rev` and appends one entry per changed object
to the `ms:changes` stream, all atomically. A reader (the xDS server, an activator) that sees
a revision jump larger than one knows it missed entries and resyncs from the hashes.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Iterable, Sequence

import redis.asyncio as aioredis

from meshserve.model import Copy, ModelSpec, Pod, copies_from_json
from meshserve.store.keys import (
    ALIASES, CHANGES, CHANGES_MAXLEN, LAST_USED, LEASE, MODELS, PLACEMENTS, PODS, REV, RUNTIMES, progress_key,
)
from meshserve.store.messages import KIND_ALIAS, KIND_MODEL

# ARGV[1]: JSON list of redis commands; ARGV[2]: JSON list of [kind, id];
# ARGV[3]: fencing token (the lease holder's id) or "" when no lease is required.
_COMMIT_LUA = """
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then
  return redis.error_reply('NOTLEADER lease lost')
end
for _, op in ipairs(cjson.decode(ARGV[1])) do
  redis.call(unpack(op))
end
local rev = redis.call('INCR', KEYS[1])
for _, ch in ipairs(cjson.decode(ARGV[2])) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'rev', rev, 'kind', ch[1], 'id', ch[2])
end
return rev
"""

# ARGV[1]: fencing token; ARGV[2]: JSON list of redis commands (all strings).
_FENCED_WRITE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER lease lost')
end
for _, op in ipairs(cjson.decode(ARGV[2])) do
  redis.call(unpack(op))
end
return 1
"""


# KEYS: aliases, models; ARGV[1]: an alias or a concrete id. {id, spec JSON or false}.
_RESOLVE_MODEL_LUA = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then id = ARGV[1] end
return {id, redis.call('HGET', KEYS[2], id)}
"""


class NotLeader(RuntimeError):
    pass


@dataclass
class Snapshot:
    """Everything routing depends on, read at one revision."""

    rev: int
    models: dict[str, ModelSpec]
    aliases: dict[str, str]
    pods: dict[str, Pod]
    placements: dict[str, dict[str, Copy]]
    # pod id -> why, for pods placement judged paused (keys.PAUSED); read by the xDS server only
    paused: dict[str, str] = field(default_factory=dict)


@dataclass
class PlacedSnapshot:
    """What the placement leader reloads from, read at one revision: pods and placements. No
    model specs: at a million registered models, reading and parsing them all was most of a
    reload and of the leader's memory, for models that mostly have no copy. The leader reads
    the specs of the models it has a use for (`models_raw`) and finds the rest as it needs
    them (placement reload.py)."""

    rev: int
    pods: dict[str, Pod]
    placements: dict[str, dict[str, Copy]]


class State:
    """Thin async access to the schema. All policy lives elsewhere."""

    def __init__(self, r: aioredis.Redis):
        self.r = r
        self._commit = r.register_script(_COMMIT_LUA)
        self._fenced_write = r.register_script(_FENCED_WRITE_LUA)
        self._resolve_model = r.register_script(_RESOLVE_MODEL_LUA)

    @classmethod
    def from_url(cls, url: str) -> "State":
        return cls(aioredis.from_url(url, decode_responses=False, health_check_interval=10))

    async def close(self) -> None:
        await self.r.aclose()

    async def commit(
        self,
        ops: Sequence[Sequence[Any]],
        changes: Iterable[tuple[str, str]],
        fence: str = "",
        lease: str = LEASE,
    ) -> int:
        """Apply `ops` (command lists built by meshserve/store/ops.py) and record `changes`, all
        or nothing; with `fence`, only while `lease` (the placement leader's unless told) is held by it."""
        rev = await _fenced(self._commit(
            keys=[REV, CHANGES, lease],
            args=[json.dumps([list(map(_s, op)) for op in ops]), json.dumps(list(changes)), fence, CHANGES_MAXLEN],
        ))
        return int(rev)

    async def fenced_write(self, ops: Sequence[Sequence[Any]], fence: str, lease: str = LEASE) -> None:
        """Apply `ops` all or nothing while `lease` is held by `fence`, without a revision: for
        writes nothing routing depends on (the leader's queue priorities, decision traces), so
        they neither bump ms:rev nor look like a missed change to the xDS server."""
        if ops:
            await _fenced(self._fenced_write(keys=[lease], args=[fence, json.dumps([[str(x) for x in op] for op in ops])]))

    async def rev(self) -> int:
        return int(await self.r.get(REV) or 0)

    async def last_change_id(self) -> bytes:
        last = await self.r.xrevrange(CHANGES, count=1)
        return last[0][0] if last else b"0-0"

    async def snapshot(self) -> Snapshot:
        """All routing state. Read inside MULTI so the hashes and rev agree."""
        async with self.r.pipeline(transaction=True) as p:
            p.get(REV).hgetall(MODELS).hgetall(ALIASES).hgetall(PODS).hgetall(PLACEMENTS)
            raw = await p.execute()
        # Parsing 100,000 models takes about a second: in a thread, so the caller's event loop
        # (lease renewal, heartbeats, streams) keeps running meanwhile.
        return await asyncio.to_thread(_parse_snapshot, *raw)

    async def placed_snapshot(self) -> PlacedSnapshot:
        """Pods and placements at one revision (inside MULTI)."""
        async with self.r.pipeline(transaction=True) as p:
            p.get(REV).hgetall(PODS).hgetall(PLACEMENTS)
            rev, pods, placements = await p.execute()
        return await asyncio.to_thread(lambda: PlacedSnapshot(
            rev=int(rev or 0),
            pods={k.decode(): Pod.from_json(v) for k, v in pods.items()},
            placements={k.decode(): copies_from_json(v) for k, v in placements.items()},
        ))

    async def models_raw(self, ids: Sequence[str], chunk: int = 10_000) -> dict[bytes, bytes]:
        """The specs of these models as stored (id bytes -> JSON bytes), unregistered ones left
        out: HMGETs of `chunk` ids, pipelined, so no single reply holds the event loop long."""
        out: dict[bytes, bytes] = {}
        if not ids:
            return out
        async with self.r.pipeline(transaction=False) as p:
            for i in range(0, len(ids), chunk):
                p.hmget(MODELS, ids[i:i + chunk])
            replies = await p.execute()
        for i, vals in zip(range(0, len(ids), chunk), replies):
            out.update((m.encode(), v) for m, v in zip(ids[i:i + chunk], vals) if v)
        return out

    async def scan_models(self, count: int = 10_000) -> AsyncIterator[dict[bytes, bytes]]:
        """Every registered model's spec as stored, `count` or so at a time (HSCAN): for a walk
        over a million that lets everything else run in between. A model changed during the
        walk may come twice or in either version; follow ms:changes from before it for those."""
        cursor = 0
        while True:
            cursor, batch = await self.r.hscan(MODELS, cursor, count=count)
            if batch:
                yield batch
            if not cursor:
                return

    async def model(self, model_id: str) -> ModelSpec | None:
        raw = await self.r.hget(MODELS, model_id)
        return ModelSpec.from_json(raw) if raw else None

    async def resolve_model(self, name: str) -> ModelSpec | None:
        """`resolve` then `model`, in one round trip: the spec registered under an alias or a
        concrete id, or None. (An adapter's load reads its base's this way, on the cold path.)"""
        _, raw = await self._resolve_model(keys=[ALIASES, MODELS], args=[name])
        return ModelSpec.from_json(raw) if raw else None

    async def resolve(self, name: str) -> str | None:
        """Alias or concrete id -> concrete id, or None when nothing is registered under it."""
        async with self.r.pipeline(transaction=False) as p:
            p.hget(ALIASES, name).hexists(MODELS, name)
            alias, exists = await p.execute()
        if alias:
            return alias.decode()
        return name if exists else None

    async def copies(self, model_id: str) -> dict[str, Copy]:
        return copies_from_json(await self.r.hget(PLACEMENTS, model_id))

    async def pod(self, pod_id: str) -> Pod | None:
        raw = await self.r.hget(PODS, pod_id)
        return Pod.from_json(raw) if raw else None

    async def progress(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The published progress of these (model, pod) loads; a pair with none (queued, not
        started, or its loader gone) is left out."""
        if not pairs:
            return {}
        raws = await self.r.mget([progress_key(m, p) for m, p in pairs])
        return {pair: json.loads(raw) for pair, raw in zip(pairs, raws) if raw}

    async def touch(self, model_ids: Iterable[str], when: float | None = None) -> None:
        when = when or time.time()
        mapping = {m: when for m in model_ids}
        if mapping:
            await self.r.zadd(LAST_USED, mapping, gt=True)

    async def set_runtimes(self, runtimes: dict[str, str]) -> None:
        """Replace ms:runtimes (name -> runtime_json) in one transaction."""
        async with self.r.pipeline(transaction=True) as p:
            p.delete(RUNTIMES)
            if runtimes:
                p.hset(RUNTIMES, mapping=runtimes)
            await p.execute()

    async def register_models(self, specs: Sequence[ModelSpec]) -> int:
        """Register (or update) models and point each alias at its newest concrete id."""
        ops: list[list[Any]] = []
        changes: list[tuple[str, str]] = []
        for s in specs:
            ops.append(["HSET", MODELS, s.id, s.to_json()])
            ops.append(["HSET", ALIASES, s.alias, s.id])
            changes += [(KIND_MODEL, s.id), (KIND_ALIAS, s.alias)]
        return await self.commit(ops, changes)

    async def remove_aliases(self, aliases: Sequence[str]) -> int:
        """Drop aliases (a deleted InferenceService), in one commit so the xDS servers see it.
        The concrete models stay registered: copies already loaded age out by LRU instead of
        failing requests that name the concrete id."""
        if not aliases:
            return await self.rev()
        return await self.commit([["HDEL", ALIASES, *aliases]], [(KIND_ALIAS, a) for a in aliases])


async def _fenced(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except aioredis.ResponseError as e:
        if "NOTLEADER" in str(e):
            raise NotLeader(str(e)) from None
        raise


def runtime_json(formats: Sequence[str], auto_formats: Sequence[str]) -> str:
    return json.dumps({"formats": list(formats), "auto_formats": list(auto_formats)}, separators=(",", ":"), sort_keys=True)


def parse_runtimes(raw: dict[bytes, bytes]) -> dict[str, tuple[list[str], list[str]]]:
    """ms:runtimes as name -> (formats, auto-selected formats); unreadable entries are skipped."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for k, v in raw.items():
        try:
            d = json.loads(v)
            out[k.decode()] = ([str(f) for f in d.get("formats", [])], [str(f) for f in d.get("auto_formats", [])])
        except (ValueError, AttributeError, TypeError):
            continue
    return out


def _parse_snapshot(rev: Any, models: dict, aliases: dict, pods: dict, placements: dict) -> Snapshot:
    return Snapshot(
        rev=int(rev or 0),
        models={k.decode(): ModelSpec.from_json(v) for k, v in models.items()},
        aliases={k.decode(): v.decode() for k, v in aliases.items()},
        pods={k.decode(): Pod.from_json(v) for k, v in pods.items()},
        placements={k.decode(): copies_from_json(v) for k, v in placements.items()},
    )


def _s(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    return v if isinstance(v, (str, int, float)) else str(v)
