"""An in-memory stand-in for the few Redis commands the placement leader and `State` use, for
pure unit tests of the leader (no server). Semantics as Redis's for what the leader relies on:
hashes, sorted sets, streams with exclusive XRANGE starts, SET NX, and the three Lua scripts
the code registers (the fenced commit, the fenced write without a revision, the lease renew),
recognised by their text and carried out in Python. `fail_next` makes the next script call
fail as a lost connection would, before it changes anything."""

from __future__ import annotations

import json
from typing import Any

import redis.exceptions


def _b(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[bytes, Any] = {}
        self.fail_next = False
        self._seq = 0
        self.scripts_run = 0  # commits and fenced writes carried out (the leader's write round trips)

    # --- scripts ------------------------------------------------------------------------
    def register_script(self, lua: str) -> Any:
        async def call(keys: list[str], args: list[Any]) -> Any:
            if self.fail_next:
                self.fail_next = False
                raise redis.exceptions.ConnectionError("injected: connection lost")
            self.scripts_run += 1
            if "INCR" in lua:  # State.commit: fence, ops, rev, changes
                if args[2] and self.data.get(_b(keys[2])) != _b(args[2]):
                    raise redis.exceptions.ResponseError("NOTLEADER lease lost")
                for op in json.loads(args[0]):
                    self.apply(op)
                rev = int(self.data.get(_b(keys[0]), b"0")) + 1
                self.data[_b(keys[0])] = _b(rev)
                for kind, id_ in json.loads(args[1]):
                    self.apply(["XADD", keys[1], "*", "rev", rev, "kind", kind, "id", id_])
                return rev
            if "PEXPIRE" in lua:  # the lease renew
                return 1 if self.data.get(_b(keys[0])) == _b(args[0]) else 0
            # the fenced write without a revision
            if self.data.get(_b(keys[0])) != _b(args[0]):
                raise redis.exceptions.ResponseError("NOTLEADER lease lost")
            for op in json.loads(args[1]):
                self.apply(op)
            return 1

        return call

    def apply(self, op: list[Any]) -> None:
        verb, key, rest = op[0].upper(), _b(op[1]), op[2:]
        if verb == "HSET":
            h = self.data.setdefault(key, {})
            for i in range(0, len(rest), 2):
                h[_b(rest[i])] = _b(rest[i + 1])
        elif verb == "HDEL":
            h = self.data.get(key, {})
            for f in rest:
                h.pop(_b(f), None)
            if not h:
                self.data.pop(key, None)
        elif verb == "ZADD":
            self.data.setdefault(key, {})[_b(rest[1])] = float(rest[0])
        elif verb == "ZREM":
            z = self.data.get(key, {})
            for m in rest:
                z.pop(_b(m), None)
            if not z:
                self.data.pop(key, None)
        elif verb == "DEL":
            self.data.pop(key, None)
        elif verb == "XACK":
            pending = self.data[b"groups:" + key][rest[0]]["pending"]
            for i in rest[1:]:
                pending.pop(_b(i), None)
        elif verb == "XADD":
            if str(rest[0]).upper() == "MAXLEN":
                rest = rest[3:]
            rest = rest[1:]  # the "*" id
            self._seq += 1
            fields = {_b(rest[i]): _b(rest[i + 1]) for i in range(0, len(rest), 2)}
            self.data.setdefault(key, []).append((f"{self._seq}-0".encode(), fields))
        else:
            raise NotImplementedError(verb)

    # --- commands -----------------------------------------------------------------------
    async def set(self, key: str, value: Any, nx: bool = False, px: int | None = None) -> bool:
        if nx and _b(key) in self.data:
            return False
        self.data[_b(key)] = _b(value)
        return True

    async def get(self, key: str) -> bytes | None:
        return self.data.get(_b(key))

    async def hget(self, key: str, field: str) -> bytes | None:
        return self.data.get(_b(key), {}).get(_b(field))

    async def hexists(self, key: str, field: str) -> bool:
        return _b(field) in self.data.get(_b(key), {})

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.data.get(_b(key), {}))

    async def hkeys(self, key: str) -> list[bytes]:
        return list(self.data.get(_b(key), {}))

    async def hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        h = self.data.get(_b(key), {})
        return [h.get(_b(f)) for f in fields]

    async def hscan(self, key: str, cursor: int = 0, count: int | None = None) -> tuple[int, dict[bytes, bytes]]:
        # One pass returns everything (cursor 0: done), as HSCAN may for a small hash.
        return 0, dict(self.data.get(_b(key), {}))

    async def zadd(self, key: str, mapping: dict[str, float], gt: bool = False) -> int:
        z = self.data.setdefault(_b(key), {})
        for m, s in mapping.items():
            if not gt or float(s) > z.get(_b(m), float("-inf")):
                z[_b(m)] = float(s)
        return len(mapping)

    async def zrange(self, key: str, start: int, end: int, withscores: bool = False) -> list[Any]:
        items = sorted(self.data.get(_b(key), {}).items(), key=lambda kv: (kv[1], kv[0]))
        return items if withscores else [m for m, _ in items]

    async def zrangebyscore(self, key: str, lo: Any, hi: Any, withscores: bool = False) -> list[Any]:
        lo_f, hi_f = float(lo), float("inf") if hi == "+inf" else float(hi)
        items = [(m, s) for m, s in await self.zrange(key, 0, -1, withscores=True) if lo_f <= s <= hi_f]
        return items if withscores else [m for m, _ in items]

    async def xadd(self, key: str, fields: dict[str, Any], maxlen: int | None = None, approximate: bool = True) -> bytes:
        self.apply(["XADD", key, "*", *[x for kv in fields.items() for x in kv]])
        return self.data[_b(key)][-1][0]

    async def xrange(self, key: str, min: str = "-", max: str = "+", count: int | None = None) -> list[Any]:
        entries = self.data.get(_b(key), [])
        if min.startswith("("):
            after = _id(min[1:].encode())
            entries = [e for e in entries if _id(e[0]) > after]
        return entries[:count] if count else list(entries)

    async def xrevrange(self, key: str, count: int | None = None) -> list[Any]:
        entries = list(reversed(self.data.get(_b(key), [])))
        return entries[:count] if count else entries

    # consumer groups: one consumer is all the leader uses
    async def xgroup_create(self, key: str, group: str, id: str = "0", mkstream: bool = False) -> None:
        groups = self.data.setdefault(b"groups:" + _b(key), {})
        if group in groups:
            raise redis.exceptions.ResponseError("BUSYGROUP Consumer Group name already exists")
        groups[group] = {"last": (0, 0), "pending": {}}
        self.data.setdefault(_b(key), [])

    async def xreadgroup(self, group: str, consumer: str, streams: dict[str, str], count: int = 1, block: int | None = None) -> list[Any]:
        (key, cursor), = streams.items()
        g = self.data[b"groups:" + _b(key)][group]
        if cursor == ">":
            new = [e for e in self.data.get(_b(key), []) if _id(e[0]) > g["last"]][:count]
            for eid, fields in new:
                g["pending"][eid] = fields
                g["last"] = _id(eid)
            entries = new
        else:
            entries = sorted(g["pending"].items(), key=lambda e: _id(e[0]))[:count]
        if not entries and block:
            import asyncio

            await asyncio.sleep(min(block / 1000, 0.02))
        return [[_b(key), entries]] if entries else []

    async def xack(self, key: str, group: str, *ids: bytes) -> int:
        pending = self.data[b"groups:" + _b(key)][group]["pending"]
        return sum(1 for i in ids if pending.pop(i, None) is not None)

    def pipeline(self, transaction: bool = True) -> "_Pipe":
        return _Pipe(self)

    async def flushdb(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass


def _id(eid: bytes) -> tuple[int, int]:
    a, b = eid.decode().split("-")
    return int(a), int(b)


class _Pipe:
    def __init__(self, r: FakeRedis):
        self.r, self.calls = r, []  # type: ignore[var-annotated]

    async def __aenter__(self) -> "_Pipe":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> "_Pipe":
            self.calls.append((name, args, kwargs))
            return self

        return record

    async def execute(self) -> list[Any]:
        out = [await getattr(self.r, n)(*a, **kw) for n, a, kw in self.calls]
        self.calls = []
        return out
