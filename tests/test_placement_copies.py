"""Kind: unit (pure). How many copies each model should have: scale up on rate, down when quiet,
minCopies and pinning, idle unload to zero, moving off draining pods."""

from __future__ import annotations

from dataclasses import replace

from meshserve.model import Copy, CopyState
from meshserve_placement import copies as cp
from meshserve_placement import policy
from meshserve_placement.tuning import Tuning

MB = 1 << 20


def view(n_pods: int = 3) -> policy.ClusterView:
    pods = {f"p{i}": policy.PodView(f"p{i}", 1000 * MB, ["x"]) for i in range(n_pods)}
    models = {m: policy.ModelView(m, "x", 10 * MB) for m in ("a", "b")}
    return policy.ClusterView(pods=pods, models=models)


def loaded(*pods: str) -> dict[str, Copy]:
    return {p: Copy(CopyState.LOADED, 10 * MB) for p in pods}


T = Tuning(scale_up_rps=10.0, scale_down_after_seconds=30.0, idle_unload_seconds=0.0)


def test_hot_model_gets_another_copy_up_to_max() -> None:
    cv = view()
    cv.set_copies("a", loaded("p0"))
    acts = cp.plan_copies(cv, {"a": 25.0}, now=100.0, tuning=T, last_added={})
    assert [(a.op, a.model) for a in acts] == [("add", "a")] and "exceeds" in acts[0].why
    cv.set_model(replace(cv.models["a"], max_copies=1))
    assert cp.plan_copies(cv, {"a": 25.0}, now=100.0, tuning=T, last_added={}) == []


def test_quiet_model_loses_copies_but_not_below_min_and_not_too_soon() -> None:
    cv = view()
    cv.set_copies("a", loaded("p0", "p1", "p2"))
    assert cp.plan_copies(cv, {"a": 1.0}, now=100.0, tuning=T, last_added={"a": 90.0}) == []  # just scaled up
    acts = cp.plan_copies(cv, {"a": 1.0}, now=200.0, tuning=T, last_added={"a": 90.0})
    assert [(a.op, a.model) for a in acts] == [("remove", "a")]
    cv.set_model(replace(cv.models["a"], min_copies=3))
    assert cp.plan_copies(cv, {"a": 1.0}, now=200.0, tuning=T, last_added={}) == []


def test_min_copies_and_pinned_load_eagerly() -> None:
    cv = view()
    cv.set_model(replace(cv.models["a"], min_copies=2))
    cv.set_model(replace(cv.models["b"], pinned=True))
    acts = cp.plan_copies(cv, {}, now=1.0, tuning=T, last_added={})
    assert sorted((a.op, a.model) for a in acts) == [("add", "a"), ("add", "b")]


def test_idle_unload_to_zero_spares_busy_pinned_and_minimum() -> None:
    cv = view()
    t = Tuning(idle_unload_seconds=60.0)
    cv.set_copies("a", loaded("p0"))
    cv.set_copies("b", loaded("p1"))
    cv.touch("a", 10.0)
    cv.touch("b", 10.0)
    acts = cp.plan_copies(cv, {}, now=100.0, tuning=t, last_added={})
    assert sorted((a.op, a.model, a.pod) for a in acts) == [("remove", "a", "p0"), ("remove", "b", "p1")]
    cv.in_flight = {"a"}
    cv.set_model(replace(cv.models["b"], pinned=True))
    assert cp.plan_copies(cv, {}, now=100.0, tuning=t, last_added={}) == []


def test_draining_pod_models_move_then_go() -> None:
    cv = view()
    cv.set_copies("a", loaded("p0"))
    acts = cp.plan_copies(cv, {}, now=1.0, tuning=T, last_added={}, draining={"p0"})
    assert [(a.op, a.model) for a in acts] == [("add", "a")]
    cv.set_copies("a", {**loaded("p0"), **loaded("p1")})
    acts = cp.plan_copies(cv, {}, now=1.0, tuning=T, last_added={}, draining={"p0"})
    assert [(a.op, a.model, a.pod) for a in acts] == [("remove", "a", "p0")]


def test_draining_pod_takes_no_new_model() -> None:
    cv = view(2)
    cv.pods["p0"].draining = True
    d = policy.place(cv.models["a"], cv, now=1.0)
    assert d.pod == "p1"
    assert any(s.step == "not-draining" for s in d.trace)


def test_a_model_in_use_whose_copies_are_all_paused_gets_one_that_answers() -> None:
    """A paused pod (its runtime accepts connections, answers nothing) keeps its copies, and a
    model only it holds that was used lately gets a copy elsewhere; the pod is placed nothing
    new. Not for a model unused for paused_cover_seconds, nor one with a copy that answers, nor
    once it has the second copy (the usual scale-down takes one away after the pause)."""
    cv = view(2)
    cv.pods["p0"].healthy, cv.pods["p0"].paused = False, True  # as the leader marks it
    cv.set_copies("a", loaded("p0"))
    cv.set_copies("b", loaded("p0"))
    cv.touch("a", 95.0)
    cv.touch("b", 10.0)
    acts = cp.plan_copies(cv, {}, now=100.0, tuning=T, last_added={})
    assert [(a.op, a.model) for a in acts] == [("add", "a")] and "paused" in acts[0].why
    assert policy.place(cv.models["a"], cv, now=100.0).pod == "p1"
    cv.set_copies("a", {**loaded("p0"), **loaded("p1")})
    assert cp.plan_copies(cv, {}, now=100.0, tuning=T, last_added={}) == []  # nor scaled down while p0 is paused
    cv.pods["p0"].healthy, cv.pods["p0"].paused = True, False
    assert [(a.op, a.model) for a in cp.plan_copies(cv, {}, now=100.0, tuning=T, last_added={})] == [("remove", "a")]  # back
    cv.pods["p0"].healthy, cv.pods["p0"].paused = False, True
    cv.set_copies("a", loaded("p0"))
    assert cp.plan_copies(cv, {}, now=100.0, tuning=replace(T, paused_cover_seconds=0.0), last_added={}) == []
    cv.pods["p1"].healthy = False  # nowhere that answers: nothing to do but wait
    cv.set_copies("a", loaded("p0"))
    assert cp.plan_copies(cv, {}, now=100.0, tuning=T, last_added={}) == []
