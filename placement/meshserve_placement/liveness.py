"""Is a pod gone, or only its loader? Pure decisions over what the leader saw: the pod's last
heartbeat and whether its runtime answered a probe.

The heartbeat comes from the loader; requests are served by the runtime. A loader that is paused,
starved of CPU or restarting stops the heartbeat while the runtime goes on serving, and
withdrawing such a pod would take its models' routes away for nothing (with every pod paused, the
whole mesh answered 503 while every runtime was up). So a pod with a stale heartbeat whose
runtime still answers is *stalled*: its copies and routes stay, nothing new is placed on it (its
loader could not carry the order out), and it is withdrawn only when the runtime stops answering
too or the stall outlasts the grace period.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Liveness(str, Enum):
    ALIVE = "alive"  # heartbeat fresh
    STALLED = "stalled"  # heartbeat stale, runtime answers: keep serving, place nothing new
    GONE = "gone"  # withdraw


@dataclass(frozen=True)
class Verdict:
    liveness: Liveness
    reason: str = ""


def judge(now: float, last_heartbeat: float, period: float, misses: int, runtime_answer: str | None, grace: float) -> Verdict:
    """`runtime_answer`: None when the runtime answered the probe, else why it did not (only
    asked for once the heartbeat is stale). `grace`: how long a stalled pod keeps its copies."""
    silent = now - last_heartbeat
    limit = period * misses
    if silent <= limit:
        return Verdict(Liveness.ALIVE)
    missed = f"no heartbeat for {silent:.1f}s (limit {limit:g}s)"
    if runtime_answer is not None:
        return Verdict(Liveness.GONE, f"{missed} and its runtime did not answer: {runtime_answer}")
    if grace <= 0:
        return Verdict(Liveness.GONE, f"{missed}; stall grace is off")
    if silent > limit + grace:
        return Verdict(Liveness.GONE, f"{missed}: its runtime still answers, but the loader has been silent past the {grace:g}s stall grace")
    return Verdict(Liveness.STALLED, f"{missed}; its runtime still answers, so its routes stay")
