"""Kind: unit (pure). The ClusterView index, maintained incrementally, always agrees with a
brute-force recomputation from `copies`, and large clusters decide over a bounded candidate set."""

from __future__ import annotations

from dataclasses import replace

import random

from meshserve.model import Copy, CopyState
from meshserve_placement import policy

MB = 1 << 20
STATES = [CopyState.LOADING, CopyState.LOADED, CopyState.LOADED, CopyState.FAILED, CopyState.UNLOADING]


def _brute_used(cv: policy.ClusterView, pod: str) -> int:
    return sum(cs[pod].size for cs in cv.copies.values() if pod in cs and cs[pod].state in (CopyState.LOADED, CopyState.LOADING))


def _brute_evictable(cv: policy.ClusterView, pod: str) -> list[str]:
    out = [m for m, cs in cv.copies.items() if pod in cs and cs[pod].state == CopyState.LOADED and cv.can_evict(m)]
    return sorted(out, key=lambda m: (cv.eviction_key(m), m))


def test_index_matches_brute_force_under_random_changes() -> None:
    rng = random.Random(42)
    pods = {f"p{i}": policy.PodView(f"p{i}", 1000 * MB, ["x"]) for i in range(4)}
    models = {f"m{i}": policy.ModelView(f"m{i}", "x", rng.randint(1, 50) * MB) for i in range(40)}
    models["m0"] = replace(models["m0"], pinned=True)
    models["m1"] = replace(models["m1"], min_copies=1)
    cv = policy.ClusterView(pods=pods, models=models)
    cv.in_flight = {"m2"}
    for step in range(3000):
        m = f"m{rng.randrange(40)}"
        r = rng.random()
        if r < 0.5:
            chosen = rng.sample(list(pods), rng.randint(0, 2))
            cs = {p: Copy(rng.choice(STATES), models[m].size) for p in chosen}
            if cs:
                cv.set_copies(m, cs)
            else:
                cv.set_copies(m, {})
        else:
            cv.touch(m, step + rng.random())
        if step % 100 == 0:
            for p in pods:
                assert cv.used(p) == _brute_used(cv, p)
                assert cv.unloading(p) == sum(cs[p].size for cs in cv.copies.values() if p in cs and cs[p].state == CopyState.UNLOADING)
                assert cv.loading(p) == sum(1 for cs in cv.copies.values() if cs.get(p) and cs[p].state == CopyState.LOADING)
                assert set(cv.pod_models(p)) == {x for x, cs in cv.copies.items() if p in cs}
                assert policy.evictable(p, cv) == _brute_evictable(cv, p)
                ev = _brute_evictable(cv, p)
                need = 30 * MB
                chosen, freed = cv.victims(p, need)
                want, got = [], 0
                for x in ev:
                    if got >= need:
                        break
                    want.append(x)
                    got += cv.copies[x][p].size
                assert (chosen, freed) == (want, got)
    # Replacing the whole table is also picked up.
    cv.copies = {"m5": {"p0": Copy(CopyState.LOADED, 7 * MB)}}
    assert cv.used("p0") == 7 * MB and cv.used("p1") == 0


def test_eviction_prefers_large_and_rarely_used_models() -> None:
    """Equal recency: the bigger model goes first; equal size: the one used once goes first."""
    pods = {"p": policy.PodView("p", 100 * MB, ["x"])}
    models = {m: policy.ModelView(m, "x", s * MB) for m, s in (("big", 40), ("small", 10), ("often", 40), ("new", 40))}
    cv = policy.ClusterView(pods=pods, models=models)
    for m in ("big", "small", "often"):
        cv.set_copies(m, {"p": Copy(CopyState.LOADED, models[m].size)})
        cv.touch(m, 100.0)
    cv.touch("often", 100.0, uses=20)
    assert policy.evictable("p", cv)[0] == "big"
    d = policy.place(models["new"], cv, now=200.0)
    assert d.pod == "p" and d.evict == ["big"]


def test_horizon_zero_is_plain_global_lru() -> None:
    pods = {"p": policy.PodView("p", 100 * MB, ["x"])}
    models = {m: policy.ModelView(m, "x", s * MB) for m, s in (("a", 10), ("b", 40))}
    cv = policy.ClusterView(pods=pods, models=models, horizon_s=0.0)
    for m, t in (("a", 1.0), ("b", 2.0)):
        cv.set_copies(m, {"p": Copy(CopyState.LOADED, models[m].size)})
        cv.touch(m, t)
    assert policy.evictable("p", cv) == ["a", "b"]


def test_large_cluster_considers_a_bounded_explained_candidate_set() -> None:
    pods = {f"pod-{i}": policy.PodView(f"pod-{i}", 100 * MB, ["x"]) for i in range(200)}
    models = {f"m{i}": policy.ModelView(f"m{i}", "x", 60 * MB) for i in range(201)}
    cv = policy.ClusterView(pods=pods, models=models)
    for i in range(200):
        cv.set_copies(f"m{i}", {f"pod-{i}": Copy(CopyState.LOADED, 60 * MB)})
        cv.touch(f"m{i}", 1000.0 + i)
    cv.touch("m17", 1.0)  # not newer: ignored
    d = policy.place(models["m200"], cv, now=5000.0)
    # The globally least recently used model (m0) is the victim, found without scanning 200 pods.
    assert d.pod == "pod-0" and d.evict == ["m0"]
    assert len(d.candidates) <= policy.VICTIM_PODS + policy.SAMPLE_PODS
    assert "a cheapest eviction" in d.explain()[0] and "of 200 pods" in d.explain()[0]
    assert policy.place(models["m200"], cv, now=5000.0).pod == d.pod  # replayable
