"""What `meshserve describe` shows, as plain data: one object with everything known about it.

Built from the readers the other commands use (explain's per-model read, status's pod rows, the
rules store) plus recent events (meshserve/events.py). Returns None when the object does not exist.
"""

from __future__ import annotations

from typing import Any

from meshserve import events
from meshserve.store.state import State
from meshserve.commands import explain
from meshserve.commands import status as status_cmd
from meshserve.rules import plan as pl
from meshserve.rules import store


def model_kind(model_id: str) -> str:
    """The kind that registered a concrete id: the id says it (`<name>__isvc-…`, `<name>__ksp-…`)."""
    if "__isvc-" in model_id:
        return "InferenceService"
    if "__ksp-" in model_id:
        return "Predictor"
    return "Model"


async def model(url: str, name: str) -> dict[str, Any] | None:
    doc = await explain.gather(url, name)
    if not doc["found"]:
        return None
    state = State.from_url(url)
    try:
        doc["events"] = await events.recent(state, model=doc["model"])
        _, _, transitions = await store.read_all(state)
    finally:
        await state.close()
    t = transitions.get(doc["alias"])
    doc["kind"] = model_kind(doc["model"])
    doc["version_move"] = t.to_dict() if t is not None else None
    return doc


async def pod(url: str, name: str) -> dict[str, Any] | None:
    data = await status_cmd.gather(url)
    row = next((p for p in data["pods"] if p["id"] == name), None)
    missing = next((p for p in data["missing_pods"] if p["id"] == name), None)
    if row is None and missing is None:
        return None
    state = State.from_url(url)
    try:
        snap = await state.snapshot()
        evs = await events.recent(state, pod=name)
    finally:
        await state.close()
    alias_of = {mid: s.alias for mid, s in snap.models.items()}
    copies = [
        {"model": mid, "alias": alias_of.get(mid, ""), **c.to_dict()}
        for mid, cs in sorted(snap.placements.items()) for p, c in cs.items() if p == name
    ]
    return {"name": name, "registered": row is not None, "pod": row, "withdrawn": missing, "copies": copies, "events": evs}


async def rule(url: str, name: str) -> dict[str, Any] | None:
    """A TrafficRule, or an InferenceService's version move (what `get rules` lists), by name."""
    state = State.from_url(url)
    try:
        rules, statuses, transitions = await store.read_all(state)
        snap = await state.snapshot()
    finally:
        await state.close()
    if name in rules:
        spec, status = rules[name], statuses.get(name, {})
        plan = pl.plan_for_rule(spec, status, snap.aliases, set(snap.models), name)
        return {"name": name, "kind": "TrafficRule", "spec": spec, "status": status, "plan": plan}
    if name in transitions:
        t = transitions[name]
        return {"name": name, "kind": "InferenceService version move", "spec": t.to_dict(), "status": {"phase": t.phase, "since": t.since, "reason": t.reason},
                "plan": pl.plan_for_transition(t)}
    return None
