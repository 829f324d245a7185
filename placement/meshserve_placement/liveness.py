"""Is a pod gone, or only paused? Pure decisions over what the leader saw: the pod's last
heartbeat and what its runtime did when probed.

The heartbeat comes from the loader; requests are served by the runtime. A loader that is paused,
starved of CPU or restarting stops the heartbeat while the runtime goes on serving, and
withdrawing such a pod would take its models' routes away for nothing (with every pod paused, the
whole mesh answered 503 while every runtime was up). So a pod with a stale heartbeat whose
runtime still answers is *stalled*: its copies and routes stay, nothing new is placed on it (its
loader could not carry the order out), and it is withdrawn only when the runtime stops answering
too or the stall outlasts the grace period.

A whole pod paused (SIGSTOP of its processes, a frozen cgroup, a VM paused for live migration, a
node swapping hard) answers nothing either, but its kernel still accepts TCP connections. A dead
runtime refuses them and an unreachable node lets the connect time out; only a paused one accepts
and stays silent. Such a pod is kept as stalled for a shorter grace: withdrawing it after 2 s
threw its copies away although it came back a second later holding them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Liveness(str, Enum):
    ALIVE = "alive"  # heartbeat fresh
    STALLED = "stalled"  # heartbeat stale, runtime answers or is paused: keep serving, place nothing new
    GONE = "gone"  # withdraw


@dataclass(frozen=True)
class Verdict:
    liveness: Liveness
    reason: str = ""
    # STALLED with a runtime that accepts connections and does not answer: requests sent to it
    # wait for it to resume, so the gateways send its copies' traffic to other copies meanwhile.
    paused: bool = False


@dataclass(frozen=True)
class Probe:
    """What the runtime did when probed. `failure` is None when it answered; `accepted` is True
    when its port accepted a new connection and then said nothing (a paused process)."""

    failure: str | None = None
    accepted: bool = False


ANSWERED = Probe()


def judge(now: float, last_heartbeat: float, period: float, misses: int, probe: Probe, grace: float, paused_grace: float = 0.0) -> Verdict:
    """`probe`: only asked for once the heartbeat is stale. `grace`: how long a pod whose runtime
    answers keeps its copies; `paused_grace`: how long one whose runtime accepts but is silent."""
    silent = now - last_heartbeat
    limit = period * misses
    if silent <= limit:
        return Verdict(Liveness.ALIVE)
    missed = f"no heartbeat for {silent:.1f}s (limit {limit:g}s)"
    if probe.failure is not None:
        if not probe.accepted or paused_grace <= 0:
            return Verdict(Liveness.GONE, f"{missed} and its runtime did not answer: {probe.failure}")
        if silent > limit + paused_grace:
            return Verdict(Liveness.GONE, f"{missed}: its runtime accepts connections but has been silent past the {paused_grace:g}s paused-pod grace")
        return Verdict(Liveness.STALLED, f"{missed}; its runtime accepts connections but does not answer ({probe.failure}): "
                                         f"paused, so its routes stay for up to {paused_grace:g}s", paused=True)
    if grace <= 0:
        return Verdict(Liveness.GONE, f"{missed}; stall grace is off")
    if silent > limit + grace:
        return Verdict(Liveness.GONE, f"{missed}: its runtime still answers, but the loader has been silent past the {grace:g}s stall grace")
    return Verdict(Liveness.STALLED, f"{missed}; its runtime still answers, so its routes stay")
