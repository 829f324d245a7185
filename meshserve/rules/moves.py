"""Version moves as the registry records them (docs/design/traffic.md): the writes that register
InferenceService specs (a recorded move instead of an alias flip while the old version serves),
and the write that ends a move. Pure: `meshserve apply`, the CLI and the rollout controller
(rollout/meshserve_rollout) share them; the rollout controller carries moves out."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from meshserve.model import ModelSpec
from meshserve.rules import plan as pl
from meshserve.store import messages
from meshserve.store import ops as store_ops


def registration(
    specs: Sequence[ModelSpec],
    percents: dict[str, int | None],
    aliases: dict[str, str],
    loaded_copies: dict[str, int],
    transitions: dict[str, pl.Transition],
    now: float,
) -> tuple[list[list[Any]], list[tuple[str, str]], list[str]]:
    """Redis writes that register `specs`. An alias whose current model is serving does not
    move: a transition is recorded and the controller moves it once the new model is ready.
    Returns (ops, changes, human notes)."""
    ops: list[list[Any]] = []
    changes: list[tuple[str, str]] = []
    notes: list[str] = []
    for s in specs:
        model_op = len(ops)
        ops.append(store_ops.set_model(s))
        changes.append((messages.KIND_MODEL, s.id))
        old = aliases.get(s.alias)
        pct = percents.get(s.alias)
        t = transitions.get(s.alias)
        if old is None:  # a new InferenceService
            ops.append(store_ops.set_alias(s.alias, s.id))
            changes.append((messages.KIND_ALIAS, s.alias))
            continue
        if old == s.id:
            if t is not None and t.new != s.id and t.phase in (pl.T_LOADING, pl.T_CANARY):
                # The spec went back to the serving version while a move was under way: cancel it.
                ops.append(store_ops.del_transition(s.alias))
                changes.append((messages.KIND_TRANSITION, s.alias))
                notes.append(f"{s.alias}: move to {t.new} cancelled, the spec is back to {old}")
            continue
        if t is not None and t.new == s.id:
            if t.phase in (pl.T_LOADING, pl.T_CANARY):
                if "minCopies" in t.extra:  # keep the move's copy boost (see below)
                    ops[model_op] = store_ops.set_model(dataclasses.replace(s, min_copies=t.copies))
                if t.percent != pct:  # only canaryTrafficPercent changed: same move, new split
                    t.percent = pct
                    ops.append(store_ops.set_transition(s.alias, t.to_dict()))
                    changes.append((messages.KIND_TRANSITION, s.alias))
                    notes.append(f"{s.alias}: canaryTrafficPercent now {pct if pct is not None else 100}")
                continue
            if t.phase == pl.T_ROLLED_BACK and t.percent == pct:
                notes.append(f"{s.alias}: stays rolled back to {old}; change the spec or canaryTrafficPercent to move again")
                continue
            # TRANSITION_FAILED (or a rolled-back move with a new percent): try again.
        if not loaded_copies.get(old) and pct is None:
            # Nothing serves the old version: nothing to protect, move at once.
            ops += [store_ops.set_alias(s.alias, s.id), store_ops.del_transition(s.alias)]
            changes += [(messages.KIND_ALIAS, s.alias), (messages.KIND_TRANSITION, s.alias)]
            continue
        nt = pl.Transition(s.alias, old, s.id, max(1, loaded_copies.get(old, 0)), pct, pl.T_LOADING, now)
        if nt.copies > s.min_copies:
            # Placement loads minCopies eagerly: that is how the new version gets as many copies
            # as the old one before traffic moves. The user's own value is restored after.
            nt.extra["minCopies"] = s.min_copies
            ops[model_op] = store_ops.set_model(dataclasses.replace(s, min_copies=nt.copies))
        ops.append(store_ops.set_transition(s.alias, nt.to_dict()))
        changes.append((messages.KIND_TRANSITION, s.alias))
        notes.append(f"{s.alias}: moving {old} -> {s.id} once {nt.copies} cop{'y' if nt.copies == 1 else 'ies'} loaded")
    return ops, changes, notes




def restore_spec_ops(raw_spec: bytes | str | None, t: pl.Transition) -> list[list[Any]]:
    """The write that gives a version its user's minCopies back after the move's boost."""
    if not raw_spec or "minCopies" not in t.extra:
        return []
    spec = ModelSpec.from_json(raw_spec)
    return [store_ops.set_model(dataclasses.replace(spec, min_copies=int(t.extra["minCopies"])))]
