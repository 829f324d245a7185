"""Rules, their status and InferenceService transitions in Redis. Thin I/O: every write goes
through State.commit with a change kind, so the xDS server rebuilds on it."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store import messages
from meshserve.store.state import State
from meshserve.rules import plan as pl

log = logging.getLogger("meshserve.rules")


def _j(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def spec_hash(spec: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha1(_j(spec).encode()).hexdigest()[:10]


async def read_all(state: State) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, pl.Transition]]:
    """(rule name -> spec, rule name -> status, alias -> transition), read in one MULTI."""
    async with state.r.pipeline(transaction=True) as p:
        p.hgetall(keys.RULES).hgetall(keys.RULE_STATUS).hgetall(keys.TRANSITIONS)
        rules_raw, status_raw, trans_raw = await p.execute()
    # A record that cannot be read (written by hand, or by a newer version) is skipped with a
    # warning: it must never stop the xDS server from building routes for everything else.
    rules = _decode(rules_raw, lambda d: d["spec"], "rule")
    statuses = _decode(status_raw, lambda d: d, "rule status")
    transitions = _decode(trans_raw, pl.Transition.from_dict, "version move")
    return rules, statuses, transitions


def _decode(raw: dict[bytes, bytes], convert: Any, what: str) -> dict[str, Any]:
    out = {}
    for k, v in raw.items():
        try:
            out[k.decode()] = convert(json.loads(v))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s %r in Redis: %s", what, k, e)
    return out


async def plans(state: State, aliases: dict[str, str], models: set[str]) -> dict[str, pl.Plan]:
    rules, statuses, transitions = await read_all(state)
    return pl.build_plans(rules, statuses, transitions, aliases, models)


def initial_status(spec: dict[str, Any], now: float) -> dict[str, Any]:
    if spec.get("canary"):
        first = spec["canary"]["steps"][0]
        phase = pl.PROGRESSING if "hold" in first else pl.PAUSED
        return {"phase": phase, "step": 0, "since": now, "reason": "", "specHash": spec_hash(spec)}
    return {"phase": pl.ACTIVE, "since": now, "reason": "", "specHash": spec_hash(spec)}


def rule_ops(docs: list[dict[str, Any]], old_status: dict[str, dict[str, Any]], now: float | None = None) -> tuple[list[list[Any]], list[tuple[str, str]]]:
    """Writes that store `docs`. Status restarts only when a rule's spec changed, so
    re-applying the same file does not restart a canary or undo a rollback."""
    now = now or time.time()
    ops: list[list[Any]] = []
    changes: list[tuple[str, str]] = []
    for d in docs:
        name = d["metadata"]["name"]
        ops.append(store_ops.set_rule(name, d))
        if old_status.get(name, {}).get("specHash") != spec_hash(d["spec"]):
            ops.append(store_ops.set_rule_status(name, initial_status(d["spec"], now)))
        changes.append((messages.KIND_RULE, name))
    return ops, changes


async def set_status(state: State, name: str, status: dict[str, Any], fence: str = "", lease: str = keys.LEASE) -> int:
    """`fence`/`lease`: the rollout controller writes only while it holds its lease (State.commit)."""
    return await state.commit([store_ops.set_rule_status(name, status)], [(messages.KIND_RULE, name)], fence, lease)


async def set_transition(state: State, t: pl.Transition, extra_ops: list[list[Any]] | None = None,
                         extra_changes: list[tuple[str, str]] | None = None, fence: str = "", lease: str = keys.LEASE) -> int:
    return await state.commit(
        [store_ops.set_transition(t.alias, t.to_dict()), *(extra_ops or [])],
        [(messages.KIND_TRANSITION, t.alias), *(extra_changes or [])],
        fence, lease,
    )


async def delete_rule(state: State, name: str) -> int:
    return await state.commit(store_ops.del_rule(name), [(messages.KIND_RULE, name)])


async def rule_docs(state: State) -> dict[str, dict[str, Any]]:
    return {k.decode(): json.loads(v) for k, v in (await state.r.hgetall(keys.RULES)).items()}
