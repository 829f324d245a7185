"""Adapters over a shared base (issue 17 item 2): pure rules the leader and the simulator share.

An adapter (a model whose spec names a base, `ModelSpec.base`) needs its base resident on its
pod. Placement books the base there once, as an ordinary copy of the base's own registered
model, placed in the same decision as the adapter when the pod does not hold it yet
(`Decision.with_base`), and loaded first: the adapter's load order is held back until the base's
copy on that pod is LOADED (`waits_for_base`), so the runtime finds the base resident, shares it,
and the adapter reports its own bytes only (loader/meshserve_loader/builtin/table.py
`load_with_base`). The rest of the rules live where their kind lives:

- where an adapter goes: the `base-loadable` filter and `fits` (base plus adapter where the base
  is not booked), the `holds-base` scorer (filters.py, scorers.py);
- a base is never evicted while its adapters have copies on the pod; they go first, the base in
  the same decision once they all go (ClusterView.victims, `base_stays`); never scaled down or
  unloaded from such a pod either (copies.plan_copies);
- a base's recency and frequency include its adapters' use (ClusterView.touch);
- a base's unload order waits for its adapters' on the pod: evicted with them, it goes once
  theirs are confirmed (`evicted`, AFTER_ADAPTERS), since the runtime keeps a base while an
  adapter uses it;
- a base rolled to a new version (the rollout controller's withdraw and retire of the old
  version's id): the adapters are re-pointed to the new version at once (the leader), so their
  next loads go over it; each copy stays over the base it was booked with
  (ClusterView.copy_base; its load order names that base by id, `order_spec`); where adapters
  are still over the old version, its copy is withdrawn from routing but stays booked, HELD,
  and is unloaded only once the last of them left that pod (`retire`, `releasable`); the copy
  reconcile moves them onto the new version, a copy first (copies.plan_copies, `rebase`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Mapping

from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.store import ops as store_ops
from meshserve_placement.view import AFTER_ADAPTERS, HELD, ClusterView


def over_ops(adapter: str, before: Mapping[str, str], after: Mapping[str, str]) -> list[list[str]]:
    """The writes that make keys.PLACEMENT_OVER follow one adapter's entries (pod -> the
    superseded base its copy there is over, ClusterView.over_of) from `before` to `after`: the
    leader writes them in the commits that change those copies, so a new leader knows which
    adapter copies keep a superseded base booked."""
    out: list[list[str]] = []
    gone = [p for p in before if p not in after]
    if gone:
        out.append(store_ops.drop_over(adapter, gone))
    changed = {p: b for p, b in after.items() if before.get(p) != b}
    if changed:
        out.append(store_ops.set_over(adapter, changed))
    return out


def resolve_base(name: str, aliases: Mapping[str, str], models: Mapping[str, object]) -> str:
    """The concrete id of the base an adapter names (an InferenceService name, or a concrete
    id): the alias's current model, as the loader resolves it (State.resolve). "" when the
    name is empty or nothing is registered under it yet."""
    if not name:
        return ""
    if name in aliases:
        return aliases[name]
    return name if name in models else ""


def waits_for_base(view: ClusterView, model: str, pod: str) -> bool:
    """The adapter `model`'s load on `pod` waits: its base's copy there is still loading. Once
    the base is LOADED the adapter's order goes and the runtime shares the resident base. A
    base copy that failed holds it too: the leader fails the adapters queued behind it in the
    same handler (events.py), and none may be sent meanwhile. A base copy gone for another
    reason does not hold the adapter up: the runtime then loads the base itself with the
    adapter and reports both (the old, conservative booking)."""
    base = view.copy_base(model, pod)
    if not base:
        return False
    c = view.copies.get(base, {}).get(pod)
    return c is not None and c.state in (CopyState.LOADING, CopyState.FAILED)


def order_spec(spec: ModelSpec, view: ClusterView, pod: str) -> ModelSpec:
    """The spec a load order carries: an adapter's base named by the id of the base placement
    booked it with on `pod` (`copy_base`), not by its InferenceService name. The loader resolves
    either (loader bases.Bases); by id it loads over exactly that base, even when the name
    moved to a new version between the order and the load (a base rolling), so what the pod
    holds is what placement counted."""
    base = view.copy_base(spec.id, pod)
    if not base or not spec.base or spec.base == base:
        return spec
    return replace(spec, base=base)


def base_priority(prio: float) -> float:
    """The queue priority of a base loaded for an adapter: just ahead of the adapter's."""
    return prio - 1e-3


def retire(view: ClusterView, model: str, orders: bool, now: float, why: str) -> tuple[dict[str, Copy], list[str]]:
    """A superseded version's copies, withdrawn (`orders` False) or retired (True), and the pods
    to send its unload order to. A loaded copy becomes UNLOADING: no route, as for any model.
    Where adapters are still loaded over it (a base rolled to a new version), it becomes HELD
    instead: still booked, since the runtime keeps a base's weights while an adapter uses them,
    and no unload order until the last of them leaves the pod (`releasable`); unloading the
    copy earlier would unbook memory the pod still holds. Copies being loaded are left alone."""
    cs = dict(view.copies.get(model, {}))
    send: list[str] = []
    for pod, c in list(cs.items()):
        kept = view.adapters_here(model, pod) > 0
        if c.state == CopyState.LOADED:
            c = cs[pod] = Copy(CopyState.UNLOADING, c.size, now, f"{HELD}; {why}" if kept else why)
        if orders and c.state == CopyState.UNLOADING:
            if waits_for_adapters(c):
                if kept:
                    continue
                cs[pod] = released(c)
            send.append(pod)
    return cs, send


def waits_for_adapters(c: Copy) -> bool:
    """A base's copy whose unload order waits for its adapters on the pod to go (HELD, or
    AFTER_ADAPTERS: evicted with them)."""
    return c.state == CopyState.UNLOADING and c.reason.startswith((HELD, AFTER_ADAPTERS))


def held(view: ClusterView, copies: Mapping[str, Mapping[str, Copy]] | None = None) -> set[tuple[str, str]]:
    """(base, pod) of every copy whose unload waits for its adapters (`waits_for_adapters`):
    what the leader, and a new leader, watch for release. O(copies)."""
    return {(m, p) for m, cs in (view.copies if copies is None else copies).items() for p, c in cs.items() if waits_for_adapters(c)}


def evicted(view: ClusterView, base: str, pod: str, c: Copy, now: float, why: str) -> tuple[Copy, bool]:
    """A copy evicted (`c` on `pod`), and whether its unload order goes now: not for a base
    whose adapters there are still on the pod (evicted in the same decision, just before it):
    its order follows theirs once confirmed (`releasable`)."""
    if view.adapters_here(base, pod):
        return Copy(CopyState.UNLOADING, c.size, now, f"{AFTER_ADAPTERS}; {why}"), False
    return Copy(CopyState.UNLOADING, c.size, now, why), True


def adopted_over(view: ClusterView, pod: str, held: Iterable[str], name_of: Mapping[str, str],
                 base_name_of: Mapping[str, str]) -> list[tuple[str, str]]:
    """A pod registering again (copies.adopt): (adapter, base) for its adapters that may be over
    another version of their base than the current one: the pod holds such a version (`name_of`:
    model -> its InferenceService name; `base_name_of`: adapter -> the name its spec gives its
    base). Which version a runtime loaded an adapter over is not reported; taking the older one
    keeps that version booked while the adapter is there, never less than the pod holds."""
    held = sorted(held)
    out = []
    for a in held:
        mv = view.models.get(a)
        name = base_name_of.get(a, "")
        if mv is None or not mv.base or not name or pod not in view.copies.get(a, {}):
            continue
        older = [m for m in held if m != mv.base and m != a and name_of.get(m) == name]
        if older:
            out.append((a, older[0]))
    return out


def releasable(view: ClusterView, candidates: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The base copies among `candidates` whose unload waits for their adapters, once no adapter
    on their pod is over them any more: their unload orders go now (`released`)."""
    out = []
    for m, p in sorted(candidates):
        c = view.copies.get(m, {}).get(p)
        if c is not None and waits_for_adapters(c) and not view.adapters_here(m, p):
            out.append((m, p))
    return out


def released(c: Copy) -> Copy:
    """A copy waiting for its adapters, once they left: an ordinary unload, its bytes held
    until confirmed."""
    why = c.reason.removeprefix(HELD).removeprefix(AFTER_ADAPTERS).lstrip("; ") or "superseded by a new version"
    return Copy(CopyState.UNLOADING, c.size, c.since, f"{why} (its adapters left)")


def revived(copies: Mapping[str, Copy], now: float) -> dict[str, Copy]:
    """A model asked for again (a request for its id, a rollout moving back to it) while copies
    of it are HELD: those copies serve again. No load is needed: the runtime never got their
    unload order and still holds them; LOADED gives them their routes back."""
    return {p: (Copy(CopyState.LOADED, c.size, now, "asked for again while kept for its adapters")
                if c.state == CopyState.UNLOADING and c.reason.startswith(HELD) else c) for p, c in copies.items()}
