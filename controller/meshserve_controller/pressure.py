"""Cache pressure per runtime pool: the signal an HPA scales runtime pods on.

Pressure is booked bytes over capacity across a pool's pods. Booked means LOADED and LOADING
copies, as placement counts them: memory is reserved when a load is decided. Above ~0.8,
loads start to evict, so the pool should grow before the LRU churns.
Pure: pods and placements in, one number per pool out.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.model import Copy, CopyState, Pod

BOOKED = (CopyState.LOADED, CopyState.LOADING)


@dataclass(frozen=True)
class PoolPressure:
    runtime: str
    pods: int
    capacity_bytes: int
    used_bytes: int

    @property
    def ratio(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


def pool_pressure(pods: dict[str, Pod], placements: dict[str, dict[str, Copy]]) -> dict[str, PoolPressure]:
    used = {p: 0 for p in pods}
    for copies in placements.values():
        for pod, c in copies.items():
            if pod in used and c.state in BOOKED:
                used[pod] += c.size
    out: dict[str, PoolPressure] = {}
    for rt in sorted({p.runtime for p in pods.values()}):
        members = [p for p in pods.values() if p.runtime == rt]
        out[rt] = PoolPressure(rt, len(members), sum(p.capacity_bytes for p in members), sum(used[p.id] for p in members))
    return out
