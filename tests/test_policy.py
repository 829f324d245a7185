"""Kind: unit (pure). The placement chain: filters, scorers, evictions, and its explanations."""

from __future__ import annotations

from dataclasses import replace

from meshserve.model import Copy, CopyState
from meshserve_placement import policy

MB = 1 << 20


def cluster(**copies: dict[str, Copy]) -> policy.ClusterView:
    pods = {p: policy.PodView(p, 100 * MB, ["sklearn"]) for p in ("pod-0", "pod-1")}
    models = {m: policy.ModelView(m, "sklearn", 40 * MB) for m in ("a", "b", "c", "new")}
    return policy.ClusterView(pods=pods, models=models, copies=dict(copies))


def test_prefers_a_pod_with_room() -> None:
    cv = cluster(a={"pod-0": Copy(CopyState.LOADED, 80 * MB)})
    d = policy.place(cv.models["new"], cv, now=1000.0)
    assert d.pod == "pod-1" and d.evict == []


def test_evicts_least_recently_used_when_full() -> None:
    cv = cluster(
        a={"pod-0": Copy(CopyState.LOADED, 60 * MB)},
        b={"pod-1": Copy(CopyState.LOADED, 60 * MB)},
    )
    cv.last_used = {"a": 10.0, "b": 500.0}
    cv.set_model(replace(cv.models["new"], size=50 * MB))
    d = policy.place(cv.models["new"], cv, now=1000.0)
    assert d.pod == "pod-0" and d.evict == ["a"]


def test_never_evicts_pinned_and_evicts_busy_only_as_a_last_resort() -> None:
    cv = cluster(a={"pod-0": Copy(CopyState.LOADED, 90 * MB)}, b={"pod-1": Copy(CopyState.LOADED, 90 * MB)})
    cv.set_model(replace(cv.models["a"], pinned=True))
    cv.in_flight = {"b"}
    d = policy.place(cv.models["new"], cv, now=1000.0)
    # Pinned pod-0 never frees up; busy b on pod-1 is the only room there is: evicted (issue 19).
    assert d.pod == "pod-1" and d.evict == ["b"] and d.evict_busy == ["b"]
    text = "\n".join(d.explain())
    assert "pod-0: fits: rejected:" in text and "pinned or kept for minCopies" in text
    assert "spares-busy=0.00" in text and "busy, evicted as a last resort: b" in text
    cv.in_flight = set()
    d = policy.place(cv.models["new"], cv, now=1001.0)
    assert d.pod == "pod-1" and d.evict == ["b"] and d.evict_busy == []


def test_busy_copies_are_evicted_least_valuable_first_after_every_idle_one() -> None:
    """Issue 19 §3: more distinct models used per busy window than fit must not starve new
    models. When idle copies do not free enough, busy ones go, in eviction-key order
    (recency + frequency), and only as many as needed."""
    pods = {"pod-0": policy.PodView("pod-0", 100 * MB, ["sklearn"])}
    models = {m: policy.ModelView(m, "sklearn", 20 * MB) for m in ("idle", "hot", "warm", "rare", "new")}
    models["new"] = replace(models["new"], size=50 * MB)
    cv = policy.ClusterView(pods=pods, models=models)
    cv.copies = {m: {"pod-0": Copy(CopyState.LOADED, 20 * MB)} for m in ("idle", "hot", "warm", "rare")}
    cv.touch("idle", 100.0)
    cv.touch("hot", 990.0, uses=500)  # used most: most valuable
    cv.touch("warm", 995.0, uses=20)
    cv.touch("rare", 999.0, uses=1)  # used last, but once: least valuable of the busy ones
    cv.in_flight = {"hot", "warm", "rare"}
    d = policy.place(models["new"], cv, now=1000.0)
    # 20 MB free; idle frees 20; one more busy copy (the cheapest, rare) makes 60 >= 50.
    assert d.pod == "pod-0" and d.evict == ["idle", "rare"] and d.evict_busy == ["rare"], d.explain()
    models["new"] = replace(models["new"], size=70 * MB)
    d = policy.place(models["new"], cv, now=1000.0)
    assert d.evict == ["idle", "rare", "warm"] and d.evict_busy == ["rare", "warm"], d.explain()
    # Room from idle copies alone: no busy copy is touched.
    models["new"] = replace(models["new"], size=40 * MB)
    d = policy.place(models["new"], cv, now=1000.0)
    assert d.evict == ["idle"] and d.evict_busy == []


def test_busy_eviction_spares_pinned_min_copies_and_just_landed_copies() -> None:
    pods = {"pod-0": policy.PodView("pod-0", 100 * MB, ["sklearn"])}
    models = {m: policy.ModelView(m, "sklearn", 25 * MB) for m in ("pinned", "floor", "landed", "other", "new")}
    models["new"] = replace(models["new"], size=40 * MB)
    models["pinned"] = replace(models["pinned"], pinned=True)
    models["floor"] = replace(models["floor"], min_copies=1)
    cv = policy.ClusterView(pods=pods, models=models)
    cv.copies = {m: {"pod-0": Copy(CopyState.LOADED, 25 * MB, since=10.0)} for m in ("pinned", "floor", "other")}
    cv.set_copies("landed", {"pod-0": Copy(CopyState.LOADED, 25 * MB, since=999.5)})  # its held requests are being forwarded
    for i, m in enumerate(("pinned", "floor", "landed", "other")):
        cv.touch(m, 900.0 + i)
    cv.in_flight = {"pinned", "floor", "landed", "other"}
    d = policy.place(models["new"], cv, now=1000.0)
    # Only `other` may go, and 25 MB is not 40: wait for the just-landed copy, never a 503.
    assert d.pod is None and d.waits_for_room == ["pod-0"], d.explain()
    # Once the landed copy is past the grace, it and `other` go; pinned and minCopies stay.
    d = policy.place(models["new"], cv, now=1001.0)
    assert d.pod == "pod-0" and sorted(d.evict) == ["landed", "other"], d.explain()
    # With only pinned and minCopies copies left beside the room, it never fits: no waiting.
    for m in ("landed", "other"):
        cv.set_model(replace(cv.models[m], pinned=True))
    d = policy.place(models["new"], cv, now=1001.0)
    assert d.pod is None and d.waits_for_room == [] and "pinned or kept for minCopies" in d.reason


def test_a_pod_with_idle_room_wins_over_one_that_must_evict_a_busy_copy() -> None:
    cv = cluster(a={"pod-0": Copy(CopyState.LOADED, 90 * MB)}, b={"pod-1": Copy(CopyState.LOADED, 90 * MB)})
    cv.touch("a", 10.0)  # busy, and cheaper by the key than idle b: still spared
    cv.touch("b", 500.0, uses=100)
    cv.in_flight = {"a"}
    d = policy.place(cv.models["new"], cv, now=1000.0)
    assert d.pod == "pod-1" and d.evict == ["b"] and d.evict_busy == [], d.explain()
    assert any(s.name == "spares-busy" for s in policy.SCORERS)


def test_waits_for_room_held_by_loads_and_busy_copies_instead_of_failing() -> None:
    """Issue 19: under churn the room is booked by copies loading, queued or serving. The
    request must wait for them (the leader retries), not get a 503; only a model that can
    never fit (bigger than the pod, or the rest pinned) is refused."""
    # b and e are busy and have just landed (their held requests are being forwarded): not
    # evicted even as a last resort until landed_grace_s has passed.
    cv = cluster(
        a={"pod-0": Copy(CopyState.LOADING, 40 * MB)},
        b={"pod-0": Copy(CopyState.LOADED, 40 * MB, since=0.5)},
        c={"pod-1": Copy(CopyState.UNLOADING, 40 * MB)},
    )
    cv.set_model(policy.ModelView("d", "sklearn", 40 * MB))
    cv.set_copies("d", {"pod-1": Copy(CopyState.LOADING, 40 * MB)})
    cv.set_model(policy.ModelView("e", "sklearn", 40 * MB))
    cv.set_copies("e", {"pod-1": Copy(CopyState.LOADED, 40 * MB, since=0.5)})
    cv.in_flight = {"b", "e"}
    d = policy.place(cv.models["new"], cv, now=1.0)
    assert d.pod is None and d.waits_for_room == ["pod-0", "pod-1"], d.explain()
    # The load lands and its request finishes (out of the busy window): the same decision now evicts.
    cv.set_copies("a", {"pod-0": Copy(CopyState.LOADED, 40 * MB)})
    cv.touch("a", 0.5)
    d = policy.place(cv.models["new"], cv, now=2.0)
    assert d.pod == "pod-0" and d.evict == ["a"]
    # Bigger than any pod: never fits, so no wait.
    cv.set_model(policy.ModelView("huge", "sklearn", 101 * MB))
    d = policy.place(cv.models["huge"], cv, now=2.0)
    assert d.pod is None and d.waits_for_room == [] and "whole capacity" in d.reason
    # Everything pinned or kept for minCopies: never fits either.
    for m in ("a", "b"):
        cv.set_model(replace(cv.models[m], pinned=True))
    cv.set_model(replace(cv.models["e"], min_copies=1))
    cv.set_model(replace(cv.models["d"], pinned=True))
    big = policy.ModelView("big", "sklearn", 30 * MB)
    cv.set_model(big)
    d = policy.place(big, cv, now=3.0)
    assert d.pod is None and d.waits_for_room == [], d.explain()
    assert "pinned or kept for minCopies" in d.reason


def test_waits_for_a_pod_whose_heartbeat_is_late_instead_of_failing() -> None:
    """Issue 19 (peer run, loaded 2-core machine): "no runtime pod can hold it" for a model
    that fits. When the loaders, or the leader reading their heartbeats, are starved for two
    periods, every pod looks unhealthy at once, and the decision said never. A pod that is still
    registered comes back or is withdrawn: the request waits for it (up to the cold-start
    timeout), and only a pod that could not take the model anyway is no reason to wait."""
    cv = cluster(a={"pod-0": Copy(CopyState.LOADED, 40 * MB)})
    for p in cv.pods.values():
        p.healthy = False
    d = policy.place(cv.models["new"], cv, now=1000.0)
    assert d.pod is None and d.waits_for_room == ["pod-0", "pod-1"], d.explain()
    assert "heartbeat" in d.reason
    # The heartbeats come back: placed.
    for p in cv.pods.values():
        p.healthy = True
    assert policy.place(cv.models["new"], cv, now=1001.0).pod == "pod-1"
    # Too big for any pod, or a runtime the late pod does not serve: no wait.
    for p in cv.pods.values():
        p.healthy = False
    cv.set_model(policy.ModelView("huge", "sklearn", 101 * MB))
    assert policy.place(cv.models["huge"], cv, now=1002.0).waits_for_room == []
    cv.set_model(policy.ModelView("onnx", "onnx", 1 * MB))
    assert policy.place(cv.models["onnx"], cv, now=1002.0).waits_for_room == []


def test_explains_every_rejection() -> None:
    cv = cluster(new={"pod-0": Copy(CopyState.LOADED, 40 * MB)})
    cv.pods["pod-1"].formats = ["xgboost"]
    d = policy.place(cv.models["new"], cv, now=1.0)
    text = "\n".join(d.explain())
    assert "pod-0: not-holding: rejected: already holds a copy (loaded)" in text
    assert "pod-1: serves-model: rejected: its runtime (unnamed) declares xgboost, not sklearn" in text
    assert d.pod is None


def test_failed_pod_is_excluded_for_a_while() -> None:
    cv = cluster()
    cv.exclude("new", "pod-0", 2000.0)
    assert policy.place(cv.models["new"], cv, now=1000.0).pod == "pod-1"
    assert policy.place(cv.models["new"], cv, now=2001.0).pod is not None


def test_every_step_has_a_name_and_description() -> None:
    for step in [*policy.FILTERS, *policy.SCORERS]:
        assert step.name and step.description


def pools(builtin: int, mlserver: int) -> policy.ClusterView:
    """Two runtime pools that both auto-select sklearn, as istio/ ships them; mlserver also
    declares xgboost without autoSelect."""
    pods = {f"b{i:02d}": policy.PodView(f"b{i:02d}", 1000 * MB, ["sklearn", "string"], runtime="meshserve-builtin") for i in range(builtin)}
    pods.update({f"m{i}": policy.PodView(f"m{i}", 1000 * MB, ["sklearn", "xgboost"], runtime="mlserver-1.x", auto_formats=["sklearn"])
                 for i in range(mlserver)})
    models = {
        "plain": policy.ModelView("plain", "sklearn", 10 * MB),
        "on-mlserver": policy.ModelView("on-mlserver", "sklearn", 10 * MB, runtime="mlserver-1.x"),
        "xgb": policy.ModelView("xgb", "xgboost", 10 * MB),
        "xgb-named": policy.ModelView("xgb-named", "xgboost", 10 * MB, runtime="mlserver-1.x"),
        "nowhere": policy.ModelView("nowhere", "sklearn", 10 * MB, runtime="triton-2.x"),
    }
    return policy.ClusterView(pods=pods, models=models)


def test_a_model_goes_to_its_runtime_pool() -> None:
    for builtin, mlserver in ((2, 2), (40, 2), (40, 30)):  # full scan, a small pool, both pools sampled
        cv = pools(builtin, mlserver)
        for t in range(20):
            # No `runtime:`: KServe's rule, the first runtime by name that auto-selects sklearn.
            assert policy.place(cv.models["plain"], cv, now=float(t)).pod.startswith("b")
            assert policy.place(cv.models["on-mlserver"], cv, now=float(t)).pod.startswith("m")
            assert policy.place(cv.models["xgb-named"], cv, now=float(t)).pod.startswith("m")


def test_a_model_no_pool_serves_says_what_to_change() -> None:
    cv = pools(2, 1)
    d = policy.place(cv.models["xgb"], cv, now=1.0)
    assert d.pod is None
    assert "no registered pod's runtime auto-selects format xgboost: name a runtime in `runtime:`" in d.reason
    d = policy.place(cv.models["nowhere"], cv, now=1.0)
    assert d.pod is None and "the model's runtime is triton-2.x (named in its `runtime:`)" in d.reason


def test_without_declared_runtimes_the_registered_pools_decide() -> None:
    cv = pools(0, 2)
    # With no builtin pod registered, mlserver is the first that auto-selects sklearn.
    assert policy.place(cv.models["plain"], cv, now=1.0).pod.startswith("m")
    cv.pods["b00"] = policy.PodView("b00", 1000 * MB, ["sklearn"], runtime="meshserve-builtin")
    assert policy.place(cv.models["plain"], cv, now=2.0).pod == "b00"
