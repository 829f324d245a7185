"""Recent events about one model or one pod, from the streams the loaders write, as
`kubectl describe` shows them (type, reason, age, from, message).

- ms:events: a loader's result for each order (op load/unload, ok, size, reason) and its
  `register` when it starts;
- ms:pod-events: what befell a pod's models besides orders (order_dropped, runtime_restart, drain).

Both streams are capped (MAXLEN), so "recent" is what they still hold; only the last `scan`
entries of each are read, newest first, so a busy mesh never makes `describe` slow.
"""

from __future__ import annotations

from typing import Any

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store.messages import Event, LoadResult, PodEvent, PodRegistered, decode_event
from meshserve.store.state import State

SCAN = 5000  # entries read from the end of each stream
REASONS = {  # (op, ok) -> kubectl-style reason; a failed order is a Warning
    ("load", True): "Loaded", ("load", False): "LoadFailed",
    ("unload", True): "Unloaded", ("unload", False): "UnloadFailed",
}
POD_REASONS = {"order_dropped": "OrderDropped", "runtime_restart": "RuntimeRestarted", "drain": "Draining"}


def _id_ts(eid: bytes) -> float:
    # Writers put their clock in `ts`; the entry id's milliseconds are Redis's, a fallback.
    return int(eid.split(b"-")[0]) / 1000


def order_event(eid: bytes, ev: Event | None) -> dict[str, Any] | None:
    """An ms:events entry as an event row, or None for one that is not about a model (or not readable)."""
    if ev is None:
        return None
    if isinstance(ev, PodRegistered):
        return {"type": "Normal", "reason": "Registered", "ts": _id_ts(eid), "from": ev.pod, "model": "",
                "message": f"loader started, holding {len(ev.models)} model(s)"}
    reason = REASONS[(ev.op, ev.ok)]
    msg = ev.reason if not ev.ok else (f"{ev.op}ed, {ev.size} bytes" if isinstance(ev, LoadResult) and ev.size else f"{ev.op}ed")
    return {"type": "Normal" if ev.ok else "Warning", "reason": reason, "ts": ev.ts or _id_ts(eid), "from": ev.pod,
            "model": ev.model, "message": msg}


def pod_event(eid: bytes, ev: PodEvent) -> dict[str, Any]:
    msg = ", ".join(x for x in (ev.reason, f"models: {', '.join(ev.models)}" if ev.models else "") if x) or ev.op
    return {"type": "Normal" if ev.op == "drain" else "Warning", "reason": POD_REASONS.get(ev.op, ev.op),
            "ts": ev.ts or _id_ts(eid), "from": ev.pod, "models": list(ev.models), "message": msg}


async def recent(state: State, model: str = "", pod: str = "", limit: int = 20) -> list[dict[str, Any]]:
    """The newest `limit` events for `model` (its loads and unloads, and pod events naming it) or
    for `pod` (its loader's results and its pod events), oldest first as kubectl lists them."""
    out: list[dict[str, Any]] = []
    for eid, fields in await store_ops.recent(state.r, keys.EVENTS, SCAN):
        e = order_event(eid, decode_event(fields))
        if e is not None and ((model and e["model"] == model) or (pod and e["from"] == pod)):
            out.append(e)
    for eid, fields in await store_ops.recent(state.r, keys.POD_EVENTS, SCAN):
        e = pod_event(eid, PodEvent.decode(fields))
        if (model and model in e["models"]) or (pod and e["from"] == pod):
            out.append(e)
    out.sort(key=lambda e: e["ts"])
    return out[-limit:]
