"""How many copies each model should have: pure decisions over the ClusterView and the
request rates, applied by the leader (scheduler.py) every `maintain_seconds`.

- A model gets another copy when its rate per copy crosses `scale_up_rps`, up to maxCopies
  (or the number of pods), and loses one when it has been quiet for a while.
- minCopies and pinned models are loaded eagerly and kept (pinned means at least one copy).
- With `idle_unload_seconds`, an unused model's copies all go, down to zero.
- Copies on a draining pod are re-placed elsewhere first, then dropped.
Copies with requests in flight (see ClusterView.in_flight) are never removed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshserve.model import CopyState
from meshserve_placement.policy import ClusterView
from meshserve_placement.tuning import Tuning


@dataclass(frozen=True)
class Action:
    op: str  # "add": place one more copy; "remove": unload the copy on `pod`
    model: str
    pod: str = ""
    why: str = ""


def floor_copies(cluster: ClusterView, model: str) -> int:
    mv = cluster.models.get(model)
    if mv is None:
        return 0
    return max(mv.min_copies, 1 if mv.pinned else 0)


def plan(
    cluster: ClusterView,
    rates: dict[str, float],
    now: float,
    tuning: Tuning,
    last_added: dict[str, float],
    draining: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[Action]:
    """At most one action per model per round, so every change is decided on fresh state."""
    out: list[Action] = []
    usable_pods = sum(1 for p in cluster.pods.values() if p.healthy and p.id not in draining)
    # Only models with copies, or with a floor, can need an action.
    todo = set(cluster.copies) | {m for m, mv in cluster.models.items() if mv.min_copies or mv.pinned}
    for m in sorted(todo):
        mv = cluster.models.get(m)
        if mv is None:
            continue
        copies = cluster.copies.get(m, {})
        live = [p for p, c in copies.items() if c.state == CopyState.LOADED]
        loading = [p for p, c in copies.items() if c.state == CopyState.LOADING]
        here = [p for p in live + loading if p not in draining]
        n = len(here)
        floor = floor_copies(cluster, m)
        cap = min(mv.max_copies or usable_pods, usable_pods)
        rate = rates.get(m, 0.0)
        if n < floor and n < cap:
            out.append(Action("add", m, why=f"below its minimum of {floor} copies ({n} now)"))
            continue
        if loading:
            continue  # let the load in progress land before deciding more
        moving = [p for p in live if p in draining]
        if moving:
            if n == 0 and (live or floor):
                out.append(Action("add", m, why=f"its pod {moving[0]} is draining"))
            else:
                out.append(Action("remove", m, moving[0], f"pod {moving[0]} is draining; the model is served elsewhere"))
            continue
        if not live:
            continue
        if rate > tuning.scale_up_rps * n and n < cap:
            out.append(Action("add", m, why=f"{rate:.1f} requests/s over {n} copies exceeds {tuning.scale_up_rps:g}/s per copy"))
            continue
        busy = m in cluster.in_flight
        want = max(floor, 1, math.ceil(rate / tuning.scale_up_rps) if rate else 1)
        quiet_for = now - last_added.get(m, 0.0)
        if (
            n > want
            and rate < tuning.scale_up_rps * (n - 1) / 2
            and quiet_for >= tuning.scale_down_after_seconds
        ):
            # Drop the copy on the fullest pod: it frees the most contended memory.
            victim = max(live, key=lambda p: (cluster.used(p) / max(1, cluster.pods[p].capacity) if p in cluster.pods else 2.0, p))
            out.append(Action("remove", m, victim, f"{rate:.1f} requests/s needs {want} copies, not {n}"))
            continue
        idle = now - cluster.last_used.get(m, now)
        if tuning.idle_unload_seconds and not busy and floor == 0 and idle >= tuning.idle_unload_seconds:
            for p in live:
                out.append(Action("remove", m, p, f"unused for {idle:.0f}s (idle unload after {tuning.idle_unload_seconds:g}s)"))
    return out
