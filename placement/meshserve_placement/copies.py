"""How many copies each model should have: pure decisions over the ClusterView and the
request rates, applied by the leader (leader.py) every `maintain_seconds`.

- A model gets another copy when its rate per copy crosses `scale_up_rps`, up to maxCopies
  (or the number of pods), and loses one when it has been quiet for a while.
- minCopies and pinned models are loaded eagerly and kept (pinned means at least one copy).
- With `idle_unload_seconds`, an unused model's copies all go, down to zero.
- Copies on a draining pod are re-placed elsewhere first, then dropped.
- A model in use whose every copy is on a paused pod gets one on a pod that answers.
Copies with requests in flight (see ClusterView.in_flight) are never removed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from meshserve.model import CopyState
from meshserve_placement.view import ClusterView
from meshserve_placement.tuning import Tuning


@dataclass(frozen=True)
class Action:
    # "add": place one more copy; "remove": unload the copy on `pod`; "rebase": place one more
    # copy of an adapter, over its base's new version, where `pod` has one over the old version
    op: str
    model: str
    pod: str = ""
    why: str = ""


def floor_copies(cluster: ClusterView, model: str) -> int:
    mv = cluster.models.get(model)
    if mv is None:
        return 0
    return max(mv.min_copies, 1 if mv.pinned else 0)


def plan_copies(
    cluster: ClusterView,
    rates: dict[str, float],
    now: float,
    tuning: Tuning,
    last_added: dict[str, float],
    draining: set[str] = frozenset(),  # type: ignore[assignment]
    scale_down: bool = True,
    only: Iterable[str] | None = None,
) -> list[Action]:
    """At most one action per model per round, so every change is decided on fresh state.
    `scale_down` False: the rates are not measured yet (a leader that just took over), so no
    copy is removed for being under-used. `only`: decide just these models (the ones whose
    copies, spec, rate or in-flight state changed, or whose `recheck_at` came); None: every
    model that can need an action."""
    out: list[Action] = []
    usable_pods = sum(1 for p in cluster.pods.values() if p.healthy and p.id not in draining)
    if only is None:
        todo = needs_planning(cluster)
    else:
        todo = {m for m in only if m in cluster.copies or _has_floor(cluster, m)}
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
            elif not cluster.base_stays(m, moving[0]):  # a base leaves after its adapters there
                out.append(Action("remove", m, moving[0], f"pod {moving[0]} is draining; the model is served elsewhere"))
            continue
        if not live:
            continue
        if all(p in cluster.pods and cluster.pods[p].paused for p in live):
            # Requests to it wait for the pause to end (or for the pod's withdrawal, then a
            # load); a copy elsewhere takes the new ones (the gateways leave a paused pod out
            # of its copy sets). The pod keeps its copy: it is likely back in seconds.
            used = now - cluster.last_used.get(m, float("-inf"))
            # A base its adapters hold there comes along with their copies elsewhere.
            theirs = any(cluster.base_stays(m, p) for p in live)
            if tuning.paused_cover_seconds and used <= tuning.paused_cover_seconds and usable_pods and not theirs:
                out.append(Action("add", m, why=f"its copies are all on paused pods ({', '.join(sorted(live))}) and it was used {used:.0f}s ago"))
            continue
        stale = [p for p in live if mv.base and cluster.copy_base(m, p) != mv.base]
        if stale:
            # An adapter still loaded over its base's superseded version (a base rolled, bases.py):
            # moved like a copy on a draining pod, a copy over the new version first, then the
            # old one goes; its base's old copy goes after its last adapter there.
            old = cluster.copy_base(m, stale[0])
            fresh = [p for p in live if p not in stale and p not in draining]
            if fresh:
                out.append(Action("remove", m, stale[0], f"loaded over {old}, superseded by {mv.base}, which serves it on {fresh[0]}"))
            else:
                out.append(Action("rebase", m, stale[0], f"loaded over {old}, superseded by {mv.base}: a copy over {mv.base} first"))
            continue
        if rate > tuning.scale_up_rps * n and n < cap:
            out.append(Action("add", m, why=f"{rate:.1f} requests/s over {n} copies exceeds {tuning.scale_up_rps:g}/s per copy"))
            continue
        busy = m in cluster.in_flight
        want = max(floor, 1, math.ceil(rate / tuning.scale_up_rps) if rate else 1)
        quiet_for = now - last_added.get(m, 0.0)
        if (
            scale_down
            and not any(p in cluster.pods and cluster.pods[p].paused for p in live)  # it may not come back
            and n > want
            and rate < tuning.scale_up_rps * (n - 1) / 2
            and quiet_for >= tuning.scale_down_after_seconds
        ):
            # Drop the copy on the fullest pod: it frees the most contended memory. Never a
            # base's copy where its adapters are: copies of a base follow its own rate, and
            # its adapters' copies keep it where they are (bases.py).
            free = [p for p in live if not cluster.base_stays(m, p)]
            if free:
                victim = max(free, key=lambda p: (cluster.used(p) / max(1, cluster.pods[p].capacity) if p in cluster.pods else 2.0, p))
                out.append(Action("remove", m, victim, f"{rate:.1f} requests/s needs {want} copies, not {n}"))
                continue
        idle = now - cluster.last_used.get(m, now)
        if tuning.idle_unload_seconds and not busy and floor == 0 and idle >= tuning.idle_unload_seconds:
            for p in live:
                if cluster.base_stays(m, p):
                    continue  # its idle adapters go this round; the base follows in a later one
                out.append(Action("remove", m, p, f"unused for {idle:.0f}s (idle unload after {tuning.idle_unload_seconds:g}s)"))
    return out


def _has_floor(cluster: ClusterView, m: str) -> bool:
    mv = cluster.models.get(m)
    return mv is not None and bool(mv.min_copies or mv.pinned)


def needs_planning(cluster: ClusterView) -> set[str]:
    """Every model that can need an action: those with copies, or with a floor. O(models)."""
    return set(cluster.copies) | {m for m, mv in cluster.models.items() if mv.min_copies or mv.pinned}


def recheck_at(cluster: ClusterView, m: str, now: float, tuning: Tuning, last_added: dict[str, float]) -> float | None:
    """When time alone (nothing else changing) could change plan_copies' verdict on `m`: its
    scale-down quiet period ending, or its idle-unload time coming. None: never, until its
    copies, spec, rate or in-flight state change (and the caller decides it again then)."""
    copies = cluster.copies.get(m, {})
    if len(copies) < 2 and not tuning.idle_unload_seconds:
        return None  # one copy at most: no scale-down, and no idle unload configured
    live = sum(1 for c in copies.values() if c.state == CopyState.LOADED)
    if not live:
        return None
    floor = floor_copies(cluster, m)
    out: list[float] = []
    if live > max(floor, 1):
        out.append(last_added.get(m, 0.0) + tuning.scale_down_after_seconds)
    if tuning.idle_unload_seconds and floor == 0 and m in cluster.last_used:
        out.append(cluster.last_used[m] + tuning.idle_unload_seconds)
    future = [t for t in out if t > now]
    return min(future) if future else None


@dataclass(frozen=True)
class Adoption:
    keep: dict[str, int]  # model -> size: copies the pod still holds that placement takes back
    drop: dict[str, str]  # model -> why: copies the pod holds that placement no longer wants


def adopt(cluster: ClusterView, pod: str, held: dict[str, int], rates: dict[str, float], tuning: Tuning) -> Adoption:
    """A pod that placement had withdrawn (its loader was paused past the heartbeat limit)
    registers again holding models placement no longer has on it. Each is kept while placement
    still wants it: the model is registered, the pod can take more work and has room, and the
    model has fewer copies than its floor and its request rate call for (a model nobody re-placed
    meanwhile always qualifies). The rest are unloaded. Most recently used first, so when room is
    short the hot models stay."""
    keep: dict[str, int] = {}
    drop: dict[str, str] = {}
    pv = cluster.pods.get(pod)
    known = cluster.pod_models(pod)
    free = (pv.capacity - cluster.used(pod)) if pv is not None else 0
    for m in sorted(held, key=lambda m: (-cluster.last_used.get(m, 0.0), m)):
        if m in known:
            continue
        mv = cluster.models.get(m)
        if mv is None:
            drop[m] = "no longer registered"
            continue
        if pv is None or pv.draining:
            drop[m] = "the pod is draining"
            continue
        size = held[m] or mv.size
        others = [c for c in cluster.copies.get(m, {}).values() if c.state in (CopyState.LOADED, CopyState.LOADING)]
        rate = rates.get(m, 0.0)
        want = max(floor_copies(cluster, m), 1, math.ceil(rate / tuning.scale_up_rps) if rate else 1)
        if mv.max_copies:
            want = min(want, mv.max_copies)
        if len(others) >= want:
            drop[m] = f"placed elsewhere meanwhile ({len(others)} copies, {want} wanted)"
        elif size > free:
            drop[m] = f"no room left on the pod for its {size} bytes"
        else:
            keep[m] = size
            free -= size
    for m in sorted(keep):  # an adapter kept keeps its base there, or goes too (bases.py)
        base = cluster.models[m].base
        if not base or base in keep or (base in known and known[base].state in (CopyState.LOADED, CopyState.LOADING)):
            continue
        size = held.get(base, 0) or (cluster.models[base].size if base in cluster.models else 0)
        if base in held and base in cluster.models and size <= free:
            keep[base] = size
            drop.pop(base, None)
            free -= size
        else:
            free += keep.pop(m)
            drop[m] = f"its base {base} is not kept on the pod"
    return Adoption(keep, drop)
