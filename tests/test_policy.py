"""Kind: unit (pure). The placement chain: filters, scorers, evictions, and its explanations."""

from __future__ import annotations

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
    cv.models["new"].size = 50 * MB
    d = policy.place(cv.models["new"], cv, now=1000.0)
    assert d.pod == "pod-0" and d.evict == ["a"]


def test_never_evicts_pinned_or_busy_models() -> None:
    cv = cluster(a={"pod-0": Copy(CopyState.LOADED, 90 * MB)}, b={"pod-1": Copy(CopyState.LOADED, 90 * MB)})
    cv.models["a"].pinned = True
    cv.in_flight = {"b"}
    d = policy.place(cv.models["new"], cv, now=1000.0)
    assert d.pod is None
    assert "only" in d.reason and "pod-0" in d.reason and "pod-1" in d.reason


def test_explains_every_rejection() -> None:
    cv = cluster(new={"pod-0": Copy(CopyState.LOADED, 40 * MB)})
    cv.pods["pod-1"].formats = ["xgboost"]
    d = policy.place(cv.models["new"], cv, now=1.0)
    text = "\n".join(d.explain())
    assert "pod-0: not-holding: rejected: already holds a copy (loaded)" in text
    assert "pod-1: serves-format: rejected" in text
    assert d.pod is None


def test_failed_pod_is_excluded_for_a_while() -> None:
    cv = cluster()
    cv.excluded[("new", "pod-0")] = 2000.0
    assert policy.place(cv.models["new"], cv, now=1000.0).pod == "pod-1"
    assert policy.place(cv.models["new"], cv, now=2001.0).pod is not None


def test_every_step_has_a_name_and_description() -> None:
    for step in [*policy.FILTERS, *policy.SCORERS]:
        assert step.name and step.description
