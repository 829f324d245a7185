"""Recent events about one model or one pod, from the streams the loaders write, as
`kubectl describe` shows them (type, reason, age, from, message).

- ms:events: a loader's result for each order (op load/unload, ok, size, reason) and its
  `register` when it starts;
- ms:pod-events: what befell a pod's models besides orders (order_dropped, runtime_restart, drain).

Both streams are capped (MAXLEN), so "recent" is what they still hold; only the last `scan`
entries of each are read, newest first, so a busy mesh never makes `describe` slow.
"""

from __future__ import annotations

import json
from typing import Any

from meshserve import state as st

SCAN = 5000  # entries read from the end of each stream
REASONS = {  # (op, ok) -> kubectl-style reason; a failed order is a Warning
    ("load", True): "Loaded", ("load", False): "LoadFailed",
    ("unload", True): "Unloaded", ("unload", False): "UnloadFailed",
}
POD_REASONS = {"order_dropped": "OrderDropped", "runtime_restart": "RuntimeRestarted", "drain": "Draining"}


def _s(fields: dict[bytes, bytes], key: str) -> str:
    return fields.get(key.encode(), b"").decode()


def _ts(eid: bytes, fields: dict[bytes, bytes]) -> float:
    # Writers put their clock in `ts`; the entry id's milliseconds are Redis's, a fallback.
    try:
        return float(_s(fields, "ts"))
    except ValueError:
        return int(eid.split(b"-")[0]) / 1000


def _models(fields: dict[bytes, bytes]) -> list[str]:
    try:
        v = json.loads(_s(fields, "models") or "[]")
    except ValueError:
        return []
    return [str(m) for m in v] if isinstance(v, list) else [str(m) for m in v or {}]


def order_event(eid: bytes, fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    """An ms:events entry as an event row, or None for one that is not about a model (or not readable)."""
    op, pod = _s(fields, "op"), _s(fields, "pod")
    if op == "register":
        return {"type": "Normal", "reason": "Registered", "ts": _ts(eid, fields), "from": pod, "model": "",
                "message": f"loader started, holding {len(_models(fields))} model(s)"}
    ok = _s(fields, "ok") == "1"
    reason = REASONS.get((op, ok))
    if reason is None:
        return None
    size = _s(fields, "size")
    msg = _s(fields, "reason") if not ok else (f"{op}ed, {size} bytes" if op == "load" and size not in ("", "0") else f"{op}ed")
    return {"type": "Normal" if ok else "Warning", "reason": reason, "ts": _ts(eid, fields), "from": pod,
            "model": _s(fields, "model"), "message": msg}


def pod_event(eid: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    op = _s(fields, "op")
    models = _models(fields)
    msg = ", ".join(x for x in (_s(fields, "reason"), f"models: {', '.join(models)}" if models else "") if x) or op
    return {"type": "Normal" if op == "drain" else "Warning", "reason": POD_REASONS.get(op, op), "ts": _ts(eid, fields),
            "from": _s(fields, "pod"), "models": models, "message": msg}


async def recent(state: st.State, model: str = "", pod: str = "", limit: int = 20) -> list[dict[str, Any]]:
    """The newest `limit` events for `model` (its loads and unloads, and pod events naming it) or
    for `pod` (its loader's results and its pod events), oldest first as kubectl lists them."""
    out: list[dict[str, Any]] = []
    for eid, fields in await state.r.xrevrange(st.EVENTS, count=SCAN):
        e = order_event(eid, fields)
        if e is not None and ((model and e["model"] == model) or (pod and e["from"] == pod)):
            out.append(e)
    for eid, fields in await state.r.xrevrange(st.POD_EVENTS, count=SCAN):
        e = pod_event(eid, fields)
        if (model and model in e["models"]) or (pod and e["from"] == pod):
            out.append(e)
    out.sort(key=lambda e: e["ts"])
    return out[-limit:]
