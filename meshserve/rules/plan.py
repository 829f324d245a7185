"""What the gateway should do for each governed model name: rules, their live status and
InferenceService transitions, resolved to concrete model ids. Pure: plain data in and out.

A Plan is the whole contract between the rule engine and the xDS renderer
(meshserve_xds/traffic.py): ordered branches (header matches, then a default), each a split
over concrete ids in percent, plus an optional mirror. The renderer knows nothing of rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("meshserve.rules")

# Rule phases (status). A rule without status is freshly applied.
ACTIVE = "Active"  # a plain rule (routes / mirror), applied as written
PROGRESSING = "Progressing"  # canary: holding a step that has a duration
PAUSED = "Paused"  # canary: holding a step until `meshserve promote`
PROMOTED = "Promoted"  # canary: reached its last step
ABORTED = "Aborted"  # canary: error rate crossed the threshold, canary at 0%
ROLLED_BACK = "RolledBack"  # `meshserve rollback`: 100% to the stable model

# InferenceService transition phases (version moves).
T_LOADING = "Loading"
T_CANARY = "Canary"
T_DRAINING = "Draining"
T_DONE = "Done"
T_FAILED = "TRANSITION_FAILED"
T_ROLLED_BACK = "RolledBack"


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    kind: str  # exact | prefix | regex | present
    value: Any


@dataclass(frozen=True)
class Branch:
    targets: tuple[tuple[str, int], ...]  # (concrete id, percent), percents sum to 100
    headers: tuple[HeaderMatch, ...] = ()
    sticky_header: str = ""


@dataclass
class Plan:
    name: str  # the model name clients call
    branches: list[Branch]  # header branches in order, the default last
    mirror: tuple[str, float] | None = None  # (concrete id, percent)
    source: str = ""  # "rule/<name>" or "isvc/<name>", for humans

    def models(self) -> set[str]:
        out = {m for b in self.branches for m, w in b.targets if w > 0}
        if self.mirror:
            out.add(self.mirror[0])
        return out


@dataclass
class Transition:
    """A version move of one InferenceService: traffic stays on `old` until `new` is ready."""

    alias: str
    old: str
    new: str
    copies: int = 1
    percent: int | None = None  # canaryTrafficPercent; None = move everything once ready
    phase: str = T_LOADING
    since: float = 0.0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "old": self.old, "new": self.new, "copies": self.copies, "percent": self.percent,
                "phase": self.phase, "since": self.since, "reason": self.reason, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Transition":
        return cls(**{k: d[k] for k in ("alias", "old", "new", "copies", "percent", "phase", "since", "reason", "extra") if k in d})


def canary_weight(spec: dict[str, Any], status: dict[str, Any]) -> int:
    """The canary's current percentage for a progressive-canary rule in `status`."""
    phase = status.get("phase")
    if phase in (ABORTED, ROLLED_BACK):
        return 0
    steps = spec["canary"]["steps"]
    if phase == PROMOTED:
        return steps[-1]["weight"]
    i = min(max(int(status.get("step", 0)), 0), len(steps) - 1)
    return int(steps[i]["weight"])


def _resolve(name: str, aliases: dict[str, str], models: set[str]) -> str | None:
    if name in aliases:
        return aliases[name]
    return name if name in models else None


def plan_for_rule(spec: dict[str, Any], status: dict[str, Any], aliases: dict[str, str], models: set[str], rule: str = "") -> Plan | None:
    stable = _resolve(spec["model"], aliases, models)
    if stable is None:
        log.warning("rule %s: model %s is no longer registered; rule ignored", rule, spec["model"])
        return None
    plan = Plan(name=spec["model"], branches=[], source=f"rule/{rule}")
    if status.get("phase") == ROLLED_BACK:
        plan.branches.append(Branch(((stable, 100),)))
        return plan
    if spec.get("canary"):
        canary = _resolve(spec["canary"]["model"], aliases, models)
        w = canary_weight(spec, status) if canary else 0
        targets = ((stable, 100 - w), (canary, w)) if canary and 0 < w < 100 else (((canary, 100),) if canary and w == 100 else ((stable, 100),))
        plan.branches.append(Branch(targets))  # type: ignore[arg-type]
    for r in spec.get("routes") or []:
        targets_l: list[tuple[str, int]] = []
        for t in r["to"]:
            cid = _resolve(t["model"], aliases, models)
            if cid is None:
                log.warning("rule %s: target %s is no longer registered; its share goes to %s", rule, t["model"], spec["model"])
                cid = stable
            w = int(t.get("weight", 100))
            targets_l.append((cid, w))
        merged: dict[str, int] = {}
        for cid, w in targets_l:
            merged[cid] = merged.get(cid, 0) + w
        headers = tuple(
            HeaderMatch(name, kind, val) for name, m in (r.get("match") or {}).get("headers", {}).items() for kind, val in m.items()
        )
        plan.branches.append(Branch(tuple(merged.items()), headers, (r.get("sticky") or {}).get("header", "")))
    if not plan.branches or plan.branches[-1].headers:
        plan.branches.append(Branch(((stable, 100),)))  # the rule's model itself is the default
    if spec.get("mirror"):
        shadow = _resolve(spec["mirror"]["model"], aliases, models)
        if shadow is not None:
            plan.mirror = (shadow, float(spec["mirror"]["percent"]))
    return plan


def plan_for_transition(t: Transition) -> Plan | None:
    """KServe's canaryTrafficPercent: `percent` to the new spec, the rest to the last ready one."""
    if t.phase == T_CANARY and t.percent is not None and 0 < t.percent < 100:
        return Plan(name=t.alias, branches=[Branch(((t.old, 100 - t.percent), (t.new, t.percent)))], source=f"isvc/{t.alias}")
    return None


def build_plans(
    rules: dict[str, dict[str, Any]],
    statuses: dict[str, dict[str, Any]],
    transitions: dict[str, Transition],
    aliases: dict[str, str],
    models: set[str],
) -> dict[str, Plan]:
    """model name -> Plan. A rule wins over an InferenceService's own canary for the same name.
    A plan that sends everything to the name's own model is dropped: the plain route does that."""
    plans: dict[str, Plan] = {}
    for t in transitions.values():
        p = plan_for_transition(t)
        if p is not None:
            plans[p.name] = p
    for name, spec in sorted(rules.items()):
        try:
            p = plan_for_rule(spec, statuses.get(name, {}), aliases, models, name)
        except (KeyError, TypeError, ValueError) as e:  # a rule written by a newer version
            log.warning("rule %s cannot be read (%s); ignored", name, e)
            continue
        if p is not None:
            plans[p.name] = p
    own = {n: _resolve(n, aliases, models) for n in plans}
    return {
        n: p for n, p in plans.items()
        if not (p.mirror is None and len(p.branches) == 1 and p.branches[0].targets == ((own[n], 100),))
    }
