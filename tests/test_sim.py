"""Kind: unit (pure, in memory). The placement simulator runs the live policy on a small Zipf
trace and beats the per-pod LRU baselines while staying close to Belady's optimum."""

from __future__ import annotations

from bench import placement_sim as sim


def test_policy_beats_per_pod_lru_and_nears_belady() -> None:
    w = sim.workload(models=2_000, requests=40_000, seed=3)
    cap = int(w.total_bytes * 0.10)
    ours = sim.simulate_policy(w, pods=8, capacity=cap)
    ray = sim.simulate_pod_lru(w, pods=8, capacity=cap, by_count=True)
    belady = sim.simulate_belady(w, cap)
    assert ours.extra["rejected"] == 0
    assert ours.hit_ratio >= ray.hit_ratio
    assert belady.hit_ratio >= ours.hit_ratio * 0.98  # Belady is (near) the ceiling
    assert ours.hit_ratio >= 0.9 * belady.hit_ratio
    assert abs(ours.loads_per_s - ours.evictions_per_s) / ours.loads_per_s < 0.2  # a full cache evicts about once per load
