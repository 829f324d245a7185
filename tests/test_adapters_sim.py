"""Kind: unit (pure, in memory). The adapters simulator runs the live policy on a small Zipf
trace over adapters of one base: with the base shared, far more adapters stay resident and hit
than with the base loaded with each adapter (ModelMesh's behaviour), and the base is never
evicted from under its adapters."""

from __future__ import annotations

from bench import adapters_sim as sim


def test_sharing_the_base_holds_more_adapters_in_the_same_memory() -> None:
    w = sim.workload(adapters=800, requests=10_000, seed=5)
    r = sim.run(w, pods=2, per_pod=1 << 27)  # 128 MiB pods: not every adapter fits
    shared, each, modelmesh = r["results"]
    assert shared["rejected"] == 0 and shared["evictions"] > 0  # a full cache, adapters evicted...
    assert shared["base_copies_at_end"] >= 1  # ...never their base
    assert shared["hit_ratio"] > 2 * each["hit_ratio"] and each["hit_ratio"] >= modelmesh["hit_ratio"]
    assert r["memory_ratio"] > 100  # 115 MB of base per adapter against ~200 KB
