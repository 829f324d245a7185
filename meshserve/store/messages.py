"""Every stream entry meshserve writes, as a frozen dataclass with one encoder and one decoder.

`encode()` gives the entry's fields as strings (the order they are written in); `decode(fields)`
reads an entry as redis-py returns it (bytes or str keys and values). Where each stream's
fields are defined, for docs/design/state.md: here, and nowhere else.

A trace context (W3C `traceparent`/`tracestate`, meshserve/tracing.py) rides along as extra
fields on the entries that carry one; `trace` holds them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Union

from meshserve.model import ModelSpec

TRACE_FIELDS = ("traceparent", "tracestate")

Fields = Mapping[Any, Any]


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _text(fields: Fields) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in fields.items()}


def _trace(f: Mapping[str, str]) -> dict[str, str]:
    return {k: f[k] for k in TRACE_FIELDS if k in f}


def _float(v: str, default: float = 0.0) -> float:
    try:
        return float(v)
    except ValueError:
        return default


def _int(v: str) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


def _json_list(v: str) -> tuple[str, ...]:
    try:
        d = json.loads(v or "[]")
    except ValueError:
        return ()
    return tuple(str(m) for m in (d if isinstance(d, list) else d or {}))


# --- ms:loadreq: asks to the placement leader, the one writer of placements and orders ---------

# load (the default; activators, `meshserve load`, rollout's preload), pin/unpin (the gateway's
# v2 repository API), withdraw/retire (rollout: a superseded version's routes, then its copies).
LOAD_OPS = ("load", "pin", "unpin", "withdraw", "retire")


@dataclass(frozen=True)
class LoadRequest:
    model: str
    op: str = "load"
    ts: float = field(default_factory=time.time)
    why: str = ""
    trace: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.op not in LOAD_OPS:
            raise ValueError(f"unknown leader request {self.op!r}")

    def encode(self) -> dict[str, str]:
        out = {"model": self.model, "op": self.op, "ts": repr(float(self.ts))}
        if self.why:
            out["why"] = self.why
        return {**out, **self.trace}

    @classmethod
    def decode(cls, fields: Fields) -> "LoadRequest":
        f = _text(fields)
        return cls(f["model"], f.get("op") or "load", _float(f.get("ts", "")), f.get("why", ""), _trace(f))


# --- ms:orders:<pod>: the leader's orders to one pod's loader ----------------------------------


@dataclass(frozen=True)
class LoadOrder:
    op: ClassVar[str] = "load"
    spec: ModelSpec
    trace: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def model(self) -> str:
        return self.spec.id

    def encode(self) -> dict[str, str]:
        return {"op": self.op, "model": self.spec.id, "spec": self.spec.to_json(), **self.trace}

    @classmethod
    def decode(cls, fields: Fields) -> "LoadOrder":
        f = _text(fields)
        return cls(ModelSpec.from_json(f["spec"]), _trace(f))


@dataclass(frozen=True)
class UnloadOrder:
    op: ClassVar[str] = "unload"
    model: str
    trace: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def encode(self) -> dict[str, str]:
        return {"op": self.op, "model": self.model, **self.trace}

    @classmethod
    def decode(cls, fields: Fields) -> "UnloadOrder":
        f = _text(fields)
        return cls(f["model"], _trace(f))


Order = Union[LoadOrder, UnloadOrder]


def decode_order(fields: Fields) -> Order:
    """An orders entry; ValueError (or KeyError) for one no loader can carry out."""
    op = _str(fields.get(b"op", fields.get("op", b"")))
    if op == "load":
        return LoadOrder.decode(fields)
    if op == "unload":
        return UnloadOrder.decode(fields)
    raise ValueError(f"unknown order {op!r}")


# --- ms:events: each loader's results, and its registration -----------------------------------


@dataclass(frozen=True)
class _Result:
    op: ClassVar[str]
    pod: str
    model: str
    ok: bool
    size: int = 0
    reason: str = ""
    ts: float = field(default_factory=time.time)
    trace: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def _fields(self) -> dict[str, str]:
        return {"pod": self.pod, "model": self.model, "op": self.op, "ok": "1" if self.ok else "0",
                "size": str(self.size), "reason": self.reason}

    def encode(self) -> dict[str, str]:
        return {**self._fields(), "ts": repr(float(self.ts)), **self.trace}


@dataclass(frozen=True)
class LoadResult(_Result):
    op: ClassVar[str] = "load"
    predicted: int | None = None  # the size the loader predicted before loading, when it did

    def _fields(self) -> dict[str, str]:
        out = super()._fields()
        if self.predicted is not None:
            out["predicted"] = str(self.predicted)
        return out

    @classmethod
    def decode(cls, fields: Fields) -> "LoadResult":
        f = _text(fields)
        predicted = _int(f["predicted"]) if f.get("predicted") else None
        return cls(f["pod"], f["model"], f.get("ok") == "1", _int(f.get("size", "")), f.get("reason", ""),
                   _float(f.get("ts", "")), _trace(f), predicted)


@dataclass(frozen=True)
class UnloadResult(_Result):
    op: ClassVar[str] = "unload"

    @classmethod
    def decode(cls, fields: Fields) -> "UnloadResult":
        f = _text(fields)
        return cls(f["pod"], f["model"], f.get("ok") == "1", _int(f.get("size", "")), f.get("reason", ""),
                   _float(f.get("ts", "")), _trace(f))


@dataclass(frozen=True)
class PodRegistered:
    """A loader (re)started: what its runtime holds, with sizes, so placement can adopt the copies
    it still wants after it had forgotten the pod."""

    op: ClassVar[str] = "register"
    pod: str
    sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.sizes)

    def encode(self) -> dict[str, str]:
        return {"op": self.op, "pod": self.pod, "models": json.dumps(list(self.sizes)), "sizes": json.dumps(dict(self.sizes))}

    @classmethod
    def decode(cls, fields: Fields) -> "PodRegistered":
        f = _text(fields)
        sizes = {str(m): int(n) for m, n in json.loads(f.get("sizes") or "{}").items()}
        return cls(f["pod"], {m: sizes.get(m, 0) for m in _json_list(f.get("models", ""))})


Event = Union[LoadResult, UnloadResult, PodRegistered]
_EVENTS: dict[str, Any] = {"load": LoadResult, "unload": UnloadResult, "register": PodRegistered}


def decode_event(fields: Fields) -> Event | None:
    """An ms:events entry, or None for one of an op nobody reads (or unreadable)."""
    cls = _EVENTS.get(_str(fields.get(b"op", fields.get("op", b""))))
    if cls is None:
        return None
    try:
        return cls.decode(fields)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


# --- ms:pod-events: what befell a pod's models besides orders -------------------------------------

POD_EVENT_OPS = ("order_dropped", "runtime_restart", "drain")


@dataclass(frozen=True)
class PodEvent:
    op: str
    pod: str
    models: tuple[str, ...] = ()
    reason: str = ""
    ts: float = field(default_factory=time.time)

    def encode(self) -> dict[str, str]:
        out = {"op": self.op, "pod": self.pod, "models": json.dumps(list(self.models))}
        if self.reason:
            out["reason"] = self.reason
        return {**out, "ts": repr(float(self.ts))}

    @classmethod
    def decode(cls, fields: Fields, fallback_ts: float = 0.0) -> "PodEvent":
        f = _text(fields)
        return cls(f.get("op", ""), f.get("pod", ""), _json_list(f.get("models", "")), f.get("reason", ""),
                   _float(f.get("ts", ""), fallback_ts))


# --- ms:changes: one entry per changed routing object, written by the commit Lua only -----------

KIND_MODEL = "model"
KIND_ALIAS = "alias"
KIND_POD = "pod"
KIND_PAUSED = "paused"  # a pod judged paused, or no longer (keys.PAUSED)
KIND_PLACEMENT = "placement"
KIND_ALL = "all"
KIND_RULE = "rule"
KIND_TRANSITION = "transition"


@dataclass(frozen=True)
class Change:
    rev: int
    kind: str
    id: str

    def encode(self) -> dict[str, str]:
        return {"rev": str(self.rev), "kind": self.kind, "id": self.id}

    @classmethod
    def decode(cls, fields: Fields) -> "Change":
        f = _text(fields)
        return cls(_int(f.get("rev", "")), f.get("kind", ""), f.get("id", ""))


# --- ms:progress:<model>|<pod>: one in-flight load's progress (JSON string with a TTL) -----------

PROGRESS_PHASES = ("pulling", "loading", "loaded", "failed")


@dataclass(frozen=True)
class Progress:
    phase: str
    done_bytes: int = 0
    total_bytes: int = 0
    started: float = 0.0
    updated: float = 0.0
    reason: str = ""

    def encode(self) -> str:
        return json.dumps({"phase": self.phase, "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                           "started": self.started, "updated": self.updated, "reason": self.reason}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> "Progress":
        d = json.loads(raw)
        return cls(str(d.get("phase", "")), int(d.get("done_bytes") or 0), int(d.get("total_bytes") or 0),
                   float(d.get("started") or 0), float(d.get("updated") or 0), str(d.get("reason", "")))


# A gateway's entry in keys.XDS_SYNCED: older than this, its xDS server is presumed gone (it
# refreshes every second) and the entry says nothing.
SYNCED_STALE_SECONDS = 3.0


@dataclass(frozen=True)
class GatewaySync:
    rev: int  # every route type the gateway ACKed was built from the state at this revision
    at: float  # unix time the xDS server last confirmed it

    def encode(self) -> str:
        return f"{self.rev} {self.at:.3f}"

    @classmethod
    def decode(cls, raw: str | bytes) -> "GatewaySync":
        rev, _, at = _str(raw).partition(" ")
        return cls(_int(rev), _float(at))


def gateways_caught_up(synced: Mapping[Any, Any], rev: int, now: float) -> bool:
    """Pure. Have the gateways applied the routes as of `rev`? True when at least one gateway
    is known (an entry refreshed within SYNCED_STALE_SECONDS) and every known one is at `rev`
    or later. With no known gateway (an xDS server that does not report, or none connected)
    nothing can be told: False, and the caller falls back to its fixed grace."""
    live = [g for g in (GatewaySync.decode(v) for v in synced.values()) if now - g.at <= SYNCED_STALE_SECONDS]
    return bool(live) and all(g.rev >= rev for g in live)
