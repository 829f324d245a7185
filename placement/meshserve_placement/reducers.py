"""Pure reducers: what a loader's result does to a model's copies. No I/O, no clock (`now` is
passed), no leader state: the leader (events.py) commits what they return, and only then does
its view follow (leader.py `_commit`).

Who retries a failed load: `load_result` says whether to (`retry`); events.py places the
retry elsewhere in the same commit as the failure, so nobody sees "failed, nothing pending".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from meshserve.model import Copy, CopyState
from meshserve.store.messages import LoadResult, UnloadResult

LIVE = (CopyState.LOADED, CopyState.LOADING)


@dataclass(frozen=True)
class LoadOutcome:
    copies: dict[str, Copy]  # the model's copies after the result
    size: int = 0  # the size the load reported (0: none, or it failed)
    exclude_until: float = 0.0  # a failed load: the pod is excluded for the model until then
    retry: bool = False  # a failed load with attempts left and no other copy: place it again


def load_result(copies: Mapping[str, Copy], ev: LoadResult, now: float, attempts: int, max_attempts: int, exclusion_s: float) -> LoadOutcome | None:
    """A load's result; None when it changes nothing (the copy was withdrawn meanwhile, or this
    event was applied already: a replay after failover). `attempts`: failed loads of this
    model so far, this one included."""
    cur = copies.get(ev.pod)
    if cur is None or cur.state != CopyState.LOADING:
        return None
    out = dict(copies)
    if ev.ok:
        size = ev.size or cur.size
        out[ev.pod] = Copy(CopyState.LOADED, size, now)
        return LoadOutcome(out, size=ev.size)
    out[ev.pod] = Copy(CopyState.FAILED, 0, now, ev.reason)
    others = any(c.state in LIVE for c in out.values())
    return LoadOutcome(out, exclude_until=now + exclusion_s, retry=attempts < max_attempts and not others)


def unload_result(copies: Mapping[str, Copy], ev: UnloadResult, now: float) -> dict[str, Copy] | None:
    """An unload's result; None when the pod holds no copy of it (nothing to change).

    A failed unload leaves the copy UNLOADING: the pod still holds the model, so its memory stays
    booked and the load queued behind this eviction waits instead of pushing the pod over its
    capacity; maintain.py orders the unload again."""
    cur = copies.get(ev.pod)
    if cur is None:
        return None
    out = dict(copies)
    if ev.ok:
        del out[ev.pod]
    else:
        out[ev.pod] = Copy(CopyState.UNLOADING, cur.size, now, f"unload failed: {ev.reason}"[:300])
    return out


def without_pod(copies: Mapping[str, Copy], pod: str) -> dict[str, Copy]:
    """A model's copies once `pod` is gone (withdrawn, or it lost them when it restarted)."""
    return {p: c for p, c in copies.items() if p != pod}


def lost_on_restart(held_by_view: Mapping[str, Copy], held_by_pod: Mapping[str, int]) -> list[str]:
    """Models the view has on a pod that registered again without them. LOADING copies stay:
    their orders are still in the pod's stream, and the agent re-reads the ones it had not
    finished, so re-sending would load twice."""
    return [m for m, c in held_by_view.items() if m not in held_by_pod and c.state in (CopyState.LOADED, CopyState.UNLOADING)]
