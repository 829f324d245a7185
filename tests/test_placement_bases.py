"""Kind: unit (pure, in-memory fakes: a ClusterView built by hand, no Redis). Placement that
knows an adapter's base (issue 17 item 2): where an adapter goes, the base booked once per pod,
a base never evicted before its adapters, a base's recency including its adapters' use, copies
per adapter and per base, and the names `meshserve explain` shows."""

from __future__ import annotations

from dataclasses import replace

from meshserve.model import Copy, CopyState, ModelSpec
from meshserve.store import ops as store_ops
from meshserve_placement import bases, copies as cp, policy
from meshserve_placement.dispatch import plan_dispatch
from meshserve_placement.tuning import Tuning
from meshserve_placement.view import HELD, QUEUED

MB = 1 << 20
ADAPTERS = ("a1", "a2", "a3")


def cluster(capacity: int = 200 * MB, **copies: dict[str, Copy]) -> policy.ClusterView:
    pods = {p: policy.PodView(p, capacity, ["sentence-transformers", "peft", "sklearn"]) for p in ("pod-0", "pod-1")}
    models = {"base": policy.ModelView("base", "sentence-transformers", 90 * MB), "other": policy.ModelView("other", "sklearn", 50 * MB)}
    models.update({a: policy.ModelView(a, "peft", 1 * MB, base="base") for a in ADAPTERS})
    return policy.ClusterView(pods=pods, models=models, copies=dict(copies))


def loaded(size: int, *pods: str) -> dict[str, Copy]:
    return {p: Copy(CopyState.LOADED, size, 0.0) for p in pods}


def book(cv: policy.ClusterView, d: policy.Decision) -> None:
    """What the leader books for a decision (decisions.py), with the loads landed at once."""
    assert d.pod is not None
    for v in d.evict:
        cv.set_copies(v, {p: c for p, c in cv.copies[v].items() if p != d.pod})
    if d.with_base:
        cv.set_copies(d.base, {**cv.copies.get(d.base, {}), d.pod: Copy(CopyState.LOADED, cv.models[d.base].size, 0.0)})
    cv.set_copies(d.model, {**cv.copies.get(d.model, {}), d.pod: Copy(CopyState.LOADED, cv.models[d.model].size, 0.0)})


def test_an_adapter_goes_where_its_base_is_and_explain_says_so() -> None:
    cv = cluster(base=loaded(90 * MB, "pod-1"))  # pod-0 is empty: more free space, fewer models
    d = policy.place(cv.models["a1"], cv, now=10.0)
    assert d.pod == "pod-1" and not d.with_base and d.base == "base"
    text = "\n".join(d.explain())
    assert "holds-base=1.00" in text and "holds-base=0.00" in text and "=> pod-1, beside its base base" in text
    assert {"base-loadable", "fits"} <= {f.name for f in policy.FILTERS} and "holds-base" in {s.name for s in policy.SCORERS}


def test_without_its_base_anywhere_an_adapter_goes_where_base_plus_adapter_fit() -> None:
    cv = cluster(other={"pod-0": Copy(CopyState.LOADED, 150 * MB, 0.0)})
    cv.set_model(replace(cv.models["other"], pinned=True))  # pod-0 has 50 MB free: the adapter alone fits, not with its base
    d = policy.place(cv.models["a1"], cv, now=10.0)
    assert d.pod == "pod-1" and d.with_base and d.evict == []
    text = "\n".join(d.explain())
    assert "pod-0: fits: rejected: needs, with its base, 91" in text or "pod-0: fits: rejected: needs, with its base, 9" in text
    assert "=> pod-1, with its base base (loaded first)" in text
    assert d.to_dict()["with_base"] is True and d.to_dict()["base"] == "base"


def test_a_base_that_failed_here_or_is_being_unloaded_keeps_its_adapters_away() -> None:
    cv = cluster()
    cv.exclude("base", "pod-0", until=100.0)
    d = policy.place(cv.models["a1"], cv, now=10.0)
    assert d.pod == "pod-1" and d.with_base
    assert any(s.pod == "pod-0" and s.step == "base-loadable" and "a load of its base base failed here" in s.result for s in d.trace)
    cv.set_copies("base", {"pod-1": Copy(CopyState.UNLOADING, 90 * MB, 0.0)})
    d = policy.place(cv.models["a1"], cv, now=10.0)
    assert d.pod is None and d.waits_for_room == ["pod-1"] and "being unloaded" in d.reason
    assert not policy.generic_refusal(d)


def test_a_base_another_runtime_serves_is_not_placed_beside_the_adapter() -> None:
    """An MLServer pool's adapter whose base the builtin runtime serves: the pool's MLModel
    loads the base from the path the loader hands it; no copy of the base can go there."""
    cv = cluster()
    for p in cv.pods.values():
        p.formats, p.runtime = ["peft"], "mlserver"
    cv.pods_changed()
    d = policy.place(cv.models["a1"], cv, now=10.0)
    assert d.pod is not None and not d.with_base and d.evict == []


def test_the_base_is_booked_once_per_pod_however_many_adapters() -> None:
    cv = cluster()
    for a in ADAPTERS:
        book(cv, policy.place(cv.models[a], cv, now=10.0))
    where = {p for a in ADAPTERS for p in cv.copies[a]}
    assert where == {"pod-0"} and set(cv.copies["base"]) == {"pod-0"}
    assert cv.used("pod-0") == 90 * MB + 3 * MB  # not 3 x (90 + 1) MB, as ModelMesh would book
    assert cv.adapters_here("base", "pod-0") == 3


def test_a_base_goes_only_after_all_its_adapters_on_that_pod() -> None:
    cv = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"), a2=loaded(1 * MB, "pod-0"),
                 other=loaded(150 * MB, "pod-1"))
    cv.set_model(replace(cv.models["other"], pinned=True))
    cv.touch("base", 1.0)  # the base is the oldest by its own use...
    cv.touch("a1", 2.0)
    cv.touch("a2", 3.0)  # ...but its adapters' use counts for it: it is now as recent as a2
    assert cv.last_used["base"] == 3.0 and cv.uses["base"] == 3
    big = policy.ModelView("big", "sklearn", 150 * MB)
    cv.set_model(big)
    d = policy.place(big, cv, now=10.0)
    assert d.pod == "pod-0" and d.evict[-1] == "base" and set(d.evict) == {"a1", "a2", "base"}
    # Room for less than the adapters free: the base stays, whatever its key.
    small = policy.ModelView("small", "sklearn", 110 * MB - 1)
    cv.set_model(small)
    d = policy.place(small, cv, now=10.0)
    assert "base" not in d.evict and d.evict
    assert "base" not in list(cv.evictable("pod-0"))


def test_an_adapter_never_evicts_its_own_base() -> None:
    cv = cluster(capacity=100 * MB, base=loaded(90 * MB, "pod-0"), other=loaded(5 * MB, "pod-0"))
    cv.set_copies("blocker", loaded(100 * MB, "pod-1"))
    cv.set_model(policy.ModelView("blocker", "sklearn", 100 * MB, pinned=True))
    cv.touch("other", 50.0)  # the base is older: without the rule it would be the cheapest eviction
    cv.set_model(replace(cv.models["a1"], size=8 * MB))  # 5 MB free: something must go
    d = policy.place(cv.models["a1"], cv, now=100.0)
    assert d.pod == "pod-0" and d.evict == ["other"] and not d.with_base
    cv.set_model(replace(cv.models["a1"], size=11 * MB))  # more than all but the base frees: never fits here
    d = policy.place(cv.models["a1"], cv, now=100.0)
    assert d.pod is None and d.waits_for_room == []


def test_copies_of_a_base_are_never_removed_where_its_adapters_are() -> None:
    cv = cluster(base=loaded(90 * MB, "pod-0", "pod-1"), a1=loaded(1 * MB, "pod-0"))
    cv.touch("a1", 1.0)  # and, through it, the base
    t = Tuning(scale_up_rps=10.0, scale_down_after_seconds=0.0, idle_unload_seconds=60.0)
    acts = cp.plan_copies(cv, {}, now=1000.0, tuning=t, last_added={})
    # Scale-down and idle unload drop the base from pod-1 only; a1 is idle and goes from pod-0.
    assert ("remove", "base", "pod-1") in {(a.op, a.model, a.pod) for a in acts}
    assert ("remove", "base", "pod-0") not in {(a.op, a.model, a.pod) for a in acts}
    assert ("remove", "a1", "pod-0") in {(a.op, a.model, a.pod) for a in acts}
    cv.pods["pod-0"].draining = True
    acts = cp.plan_copies(cv, {"a1": 1.0}, now=1000.0, tuning=Tuning(), last_added={}, draining={"pod-0"})
    assert ("remove", "base", "pod-0") not in {(a.op, a.model, a.pod) for a in acts}


def test_an_adapters_copies_follow_its_own_load_and_bring_the_base() -> None:
    cv = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"))
    acts = cp.plan_copies(cv, {"a1": 50.0}, now=1000.0, tuning=Tuning(scale_up_rps=10.0), last_added={})
    assert [(a.op, a.model) for a in acts] == [("add", "a1")]
    d = policy.place(cv.models["a1"], cv, now=1000.0)
    assert d.pod == "pod-1" and d.with_base  # a second copy of the adapter brings a copy of its base


def test_an_adapters_load_order_waits_for_its_base_on_that_pod() -> None:
    # Both queued (no order sent yet); the plan reads the queue as (priority, model) from its head.
    cv = cluster(base={"pod-0": Copy(CopyState.LOADING, 90 * MB, 0.0, QUEUED)}, a1={"pod-0": Copy(CopyState.LOADING, 1 * MB, 0.0, QUEUED)})
    specs = {m: object() for m in ("base", "a1")}
    queue = [(1.0 - 1e-3, "base"), (1.0, "a1")]
    assert plan_dispatch(cv, "pod-0", queue, specs, 0.0).send == ["base"]  # type: ignore[arg-type]
    assert bases.waits_for_base(cv, "a1", "pod-0")
    cv.set_copies("base", loaded(90 * MB, "pod-0"))
    assert plan_dispatch(cv, "pod-0", [(1.0, "a1")], specs, 0.0).send == ["a1"]  # type: ignore[arg-type]
    cv.set_copies("base", {"pod-0": Copy(CopyState.FAILED, 0, 0.0)})  # the leader fails a1 here next
    assert bases.waits_for_base(cv, "a1", "pod-0")
    cv.set_copies("base", {})  # a base copy that went does not hold the adapter forever
    assert not bases.waits_for_base(cv, "a1", "pod-0")


def test_the_adapter_index_follows_rollback() -> None:
    cv = cluster(base=loaded(90 * MB, "pod-0"))
    cv.begin()
    cv.set_copies("a1", loaded(1 * MB, "pod-0"))
    cv.set_model(policy.ModelView("a9", "peft", MB, base="base"))
    cv.set_copies("a9", loaded(1 * MB, "pod-0"))
    assert cv.adapters_here("base", "pod-0") == 2
    cv.rollback()
    assert cv.adapters_here("base", "pod-0") == 0 and "a9" not in cv.models


def test_a_base_is_named_by_its_inference_service_name() -> None:
    assert bases.resolve_base("minilm", {"minilm": "minilm__isvc-1"}, {}) == "minilm__isvc-1"
    assert bases.resolve_base("m__isvc-2", {}, {"m__isvc-2": object()}) == "m__isvc-2"
    assert bases.resolve_base("gone", {}, {}) == "" and bases.resolve_base("", {}, {}) == ""


def test_a_pod_registering_again_keeps_an_adapter_only_with_its_base() -> None:
    cv = cluster(base=loaded(90 * MB, "pod-1"))  # re-placed on pod-1 while pod-0 was away
    cv.touch("a1", 5.0)
    kept = cp.adopt(cv, "pod-0", {"base": 90 * MB, "a1": 1 * MB}, {}, Tuning())
    assert kept.keep == {"a1": 1 * MB, "base": 90 * MB} and kept.drop == {}
    small = cluster(capacity=50 * MB, base=loaded(90 * MB, "pod-1"))  # no room for the base here: the adapter goes too
    kept = cp.adopt(small, "pod-0", {"base": 90 * MB, "a1": 1 * MB}, {}, Tuning())
    assert kept.keep == {} and set(kept.drop) == {"a1", "base"}


def full_of_pairs() -> policy.ClusterView:
    """Two pods each full with two base+adapter pairs (a_i over b_i, ModelMesh-style: a base per
    adapter), used in the order a0..a3, and a fifth pair a4/b4 registered but not loaded."""
    pods = {p: policy.PodView(p, 200 * MB, ["sentence-transformers", "peft"]) for p in ("pod-0", "pod-1")}
    models = {f"b{i}": policy.ModelView(f"b{i}", "sentence-transformers", 90 * MB) for i in range(5)}
    models.update({f"a{i}": policy.ModelView(f"a{i}", "peft", 1 * MB, base=f"b{i}") for i in range(5)})
    copies = {}
    for i, pod in enumerate(("pod-0", "pod-0", "pod-1", "pod-1")):
        copies[f"b{i}"] = loaded(90 * MB, pod)
        copies[f"a{i}"] = loaded(1 * MB, pod)
    cv = policy.ClusterView(pods=pods, models=models, copies=copies)
    for i in range(4):
        cv.touch(f"a{i}", float(i + 1))
    return cv


def test_a_base_whose_adapters_are_all_busy_goes_with_them_as_a_last_resort() -> None:
    """ModelMesh-style churn (each adapter over a base of its own, bench/adapters.py): every pod
    full of base+adapter pairs whose adapters have requests in flight. A new pair must still get
    room by evicting a busy adapter *and* its base, as a last resort; evicting only the adapter
    frees too little, and the request used to wait for room until its cold-start timeout."""
    cv = full_of_pairs()
    cv.in_flight = {"a0", "a1", "a2", "a3"}
    d = policy.place(cv.models["a4"], cv, now=100.0)
    assert d.pod is not None, d.reason
    assert d.with_base and len(d.evict) == 2 and {m[0] for m in d.evict} == {"a", "b"}
    gone = next(m for m in d.evict if m.startswith("a"))
    assert f"b{gone[1:]}" in d.evict and gone in d.evict_busy


def test_an_idle_adapters_base_goes_with_it_before_other_adapters_are_evicted() -> None:
    """The same pairs, idle: room for a new pair costs one old pair, not every adapter first."""
    cv = full_of_pairs()
    d = policy.place(cv.models["a4"], cv, now=100.0)
    assert d.pod is not None and d.with_base and not d.evict_busy
    assert len(d.evict) == 2 and {m[0] for m in d.evict} == {"a", "b"}


def test_a_queued_load_that_no_longer_fits_is_decided_again_not_left_waiting() -> None:
    """Found by bench.adapters (a base per adapter): the adapter was booked beside its base, the
    base then reported more bytes than it had booked, and the adapter's queued load no longer
    fitted. Nothing on the pod was loading or unloading, so no room would ever free: its request
    got a 503 after 60 s. The plan now marks such a head load stuck (the leader withdraws it and
    decides it again, evicting); while an unload or a load is under way it still waits."""
    cv = cluster(capacity=100 * MB, base=loaded(95 * MB, "pod-0"), a1={"pod-0": Copy(CopyState.LOADING, 8 * MB, 0.0, QUEUED)})
    specs = {m: object() for m in ("base", "a1")}
    plan = plan_dispatch(cv, "pod-0", [(1.0, "a1")], specs, 0.0)  # type: ignore[arg-type]
    assert plan.send == [] and plan.stuck == ["a1"]
    cv.set_copies("other", {"pod-0": Copy(CopyState.UNLOADING, 5 * MB, 0.0)})  # room is on its way
    plan = plan_dispatch(cv, "pod-0", [(1.0, "a1")], specs, 0.0)  # type: ignore[arg-type]
    assert plan.send == [] and plan.stuck == []


# --- a base rolled to a new version (bases.retire, ClusterView.copy_base) ---------------------


def rolled(**extra: dict[str, Copy]) -> policy.ClusterView:
    """`base` (v1) on pod-0 with a1 and a2 loaded over it; `base2`, its new version, registered
    (the rollout loaded it on pod-1); the adapters re-pointed to it, as the leader does when the
    old version is withdrawn (leader_requests._repoint_adapters)."""
    cv = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"), a2=loaded(1 * MB, "pod-0"),
                 base2=loaded(90 * MB, "pod-1"), **extra)
    cv.set_model(policy.ModelView("base2", "sentence-transformers", 90 * MB))
    for a in ADAPTERS:
        cv.set_model(replace(cv.models[a], base="base2"))
    return cv


def test_adapters_loaded_over_a_rolled_base_keep_it_booked_until_they_leave() -> None:
    """What the user sees on pod-0: the runtime keeps v1's weights while a1 and a2 use them, so
    v1 stays booked (HELD: no route) and no unload order goes until the last of them is gone;
    then it is unloaded like any superseded version."""
    cv = rolled()
    assert cv.models["a1"].base == "base2" and cv.adapters_of("base2") == frozenset(ADAPTERS)
    # The copies already loaded are over v1: v1 stays counted there, v2 is not needed there for them.
    assert cv.copy_base("a1", "pod-0") == "base" and cv.adapters_here("base", "pod-0") == 2
    assert cv.adapters_here("base2", "pod-0") == 0
    booked_before = cv.used("pod-0")
    assert booked_before == 92 * MB

    copies, send = bases.retire(cv, "base", orders=False, now=5.0, why="superseded by base2")
    assert send == [] and copies["pod-0"].state == CopyState.UNLOADING and copies["pod-0"].reason.startswith(HELD)
    cv.set_copies("base", copies)
    assert cv.used("pod-0") == booked_before and cv.unloading("pod-0") == 0  # booked = what the pod holds
    copies, send = bases.retire(cv, "base", orders=True, now=6.0, why="superseded by base2")
    assert send == [] and copies == cv.copies["base"]  # the retire sends nothing while they are there
    assert bases.held(cv) == {("base", "pod-0")}
    assert "base" not in list(cv.evictable("pod-0"))

    # The adapters keep answering over v1 (LOADED, routed); a1 goes (say, evicted): v1 still kept for a2.
    cv.set_copies("a1", {"pod-0": Copy(CopyState.UNLOADING, 1 * MB, 7.0)})
    assert bases.releasable(cv, bases.held(cv)) == []
    cv.set_copies("a1", {})  # its unload confirmed
    assert bases.releasable(cv, bases.held(cv)) == []
    cv.set_copies("a2", {})
    assert bases.releasable(cv, bases.held(cv)) == [("base", "pod-0")]
    gone = bases.released(cv.copies["base"]["pod-0"])
    assert gone.state == CopyState.UNLOADING and not gone.reason.startswith(HELD) and "superseded by base2" in gone.reason
    cv.set_copies("base", {"pod-0": gone})
    assert cv.used("pod-0") == 0 and cv.unloading("pod-0") == 90 * MB  # held until the pod confirms
    # Loaded again on pod-0, an adapter goes over v2 (and brings it there).
    d = policy.place(cv.models["a1"], cv, now=10.0)
    assert d.base == "base2"


def test_a_rolled_base_without_adapters_is_unloaded_as_before() -> None:
    cv = rolled()
    cv.set_copies("a1", {})
    cv.set_copies("a2", {})
    copies, send = bases.retire(cv, "base", orders=False, now=5.0, why="superseded")
    assert send == [] and copies["pod-0"] == Copy(CopyState.UNLOADING, 90 * MB, 5.0, "superseded")
    cv.set_copies("base", copies)
    assert cv.used("pod-0") == 0 and cv.unloading("pod-0") == 90 * MB
    assert bases.retire(cv, "base", orders=True, now=6.0, why="superseded")[1] == ["pod-0"]


def test_a_load_queued_before_the_roll_goes_over_the_base_it_was_booked_with() -> None:
    """A load decided before the roll, still queued behind its base's (v1's) copy: it stays
    counted for v1, waits for v1 there, and its order names v1 by id, so the loader loads it
    over the base placement booked even though the name now means v2. A copy placed after the
    roll is over v2."""
    cv = cluster(base={"pod-0": Copy(CopyState.LOADING, 90 * MB, 0.0, QUEUED)},
                 a3={"pod-0": Copy(CopyState.LOADING, 1 * MB, 0.0, QUEUED)})
    cv.set_model(policy.ModelView("base2", "sentence-transformers", 90 * MB))
    cv.set_model(replace(cv.models["a3"], base="base2"))
    assert cv.copy_base("a3", "pod-0") == "base" and cv.adapters_here("base", "pod-0") == 1
    assert bases.waits_for_base(cv, "a3", "pod-0")
    spec = ModelSpec(id="a3", alias="a3", format="peft", storage={"path": "a3"}, base="minilm")
    assert bases.order_spec(spec, cv, "pod-0").base == "base"
    cv.set_copies("a3", {**cv.copies["a3"], "pod-1": Copy(CopyState.LOADING, 1 * MB, 1.0, QUEUED)})
    assert cv.copy_base("a3", "pod-1") == "base2" and bases.order_spec(spec, cv, "pod-1").base == "base2"
    plain = ModelSpec(id="other", alias="other", format="sklearn", storage={"path": "o"})
    assert bases.order_spec(plain, cv, "pod-0") is plain


def test_the_roll_is_taken_back_with_a_failed_commit() -> None:
    """The re-pointing and the copies that went are journaled: a commit that fails leaves the
    index as it was (ClusterView.rollback), over the old base."""
    cv = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"), a2=loaded(1 * MB, "pod-0"))
    cv.set_model(policy.ModelView("base2", "sentence-transformers", 90 * MB))
    before = ({p: dict(ix.adapters) for p, ix in cv.index().items()}, cv.used("pod-0"))
    cv.begin()
    for a in ADAPTERS:
        cv.set_model(replace(cv.models[a], base="base2"))
    cv.set_copies("base", bases.retire(cv, "base", orders=False, now=5.0, why="x")[0])
    cv.set_copies("a1", {})
    cv.set_copies("a3", loaded(1 * MB, "pod-0"))  # a new copy: over v2
    assert cv.adapters_here("base", "pod-0") == 1 and cv.adapters_here("base2", "pod-0") == 1
    cv.rollback()
    assert ({p: dict(ix.adapters) for p, ix in cv.index().items()}, cv.used("pod-0")) == before
    assert cv.models["a1"].base == "base" and cv.copy_base("a2", "pod-0") == "base"
    assert cv.adapters_of("base") == frozenset(ADAPTERS) and not cv.adapters_of("base2")


def test_a_new_leader_finds_which_adapters_are_over_a_held_base() -> None:
    """After a failover the view is rebuilt from Redis: the copies, and which adapter copies are
    over a superseded base (the entries bases.over_ops writes, read back with hold_over). The
    rebuilt index equals the old leader's; without the entries v1 would be unbooked under a1, a2."""
    cv = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"), a2=loaded(1 * MB, "pod-0"),
                 base2=loaded(90 * MB, "pod-1"))
    cv.set_model(policy.ModelView("base2", "sentence-transformers", 90 * MB))
    redis: dict[str, str] = {}  # the OVER hash, as the leader's commits write it

    def write(cmds: list[list[str]]) -> None:
        for c in cmds:
            if c[0] == "HSET":
                redis.update(zip(c[2::2], c[3::2]))
            else:
                for f in c[2:]:
                    redis.pop(f, None)

    for a in ADAPTERS:
        before = dict(cv.over_of(a))
        cv.set_model(replace(cv.models[a], base="base2"))
        write(bases.over_ops(a, before, cv.over_of(a)))
    assert redis == {"a1|pod-0": "base", "a2|pod-0": "base"}
    cv.set_copies("a3", {"pod-0": Copy(CopyState.LOADED, 1 * MB, 9.0)})  # placed after the roll: over v2
    cv.set_copies("base2", {**cv.copies["base2"], "pod-0": Copy(CopyState.LOADED, 90 * MB, 8.5)})
    cv.set_copies("base", bases.retire(cv, "base", orders=True, now=5.0, why="superseded")[0])
    fresh = policy.ClusterView(pods=cv.pods, models=dict(cv.models), copies={m: dict(cs) for m, cs in cv.copies.items()})
    assert fresh.adapters_here("base", "pod-0") == 0
    for field, b in redis.items():
        a, pod = store_ops.parse_over_field(field)
        fresh.hold_over(a, pod, b)
    assert {p: dict(ix.adapters) for p, ix in fresh.index().items()} == {p: dict(ix.adapters) for p, ix in cv.index().items()}
    assert fresh.used("pod-0") == cv.used("pod-0") == (90 + 90 + 3) * MB
    before = dict(cv.over_of("a1"))
    cv.set_copies("a1", {})  # its copy went: its entry goes in the same commit
    write(bases.over_ops("a1", before, cv.over_of("a1")))
    assert redis == {"a2|pod-0": "base"}


def test_adapters_over_a_rolled_base_move_to_the_new_one_copy_first() -> None:
    """The copy reconcile moves an adapter still loaded over the old version as it moves a copy
    off a draining pod: a copy over the new version first (`rebase`: the leader places one; the
    pod holding the stale copy cannot take a second), then the stale copy goes, and with the
    last of them the old version's HELD copy can go."""
    cv = rolled()
    cv.set_copies("base", bases.retire(cv, "base", orders=True, now=5.0, why="superseded")[0])
    acts = cp.plan_copies(cv, {}, now=100.0, tuning=Tuning(), last_added={})
    assert {(a.op, a.model, a.pod) for a in acts} == {("rebase", "a1", "pod-0"), ("rebase", "a2", "pod-0")}
    d = policy.place(cv.models["a1"], cv, now=100.0)
    assert d.pod == "pod-1" and not d.with_base and d.base == "base2"  # beside v2, which the rollout loaded there
    book(cv, d)
    acts = cp.plan_copies(cv, {}, now=101.0, tuning=Tuning(), last_added={})
    assert ("remove", "a1", "pod-0") in {(a.op, a.model, a.pod) for a in acts}
    cv.set_copies("a1", {"pod-1": cv.copies["a1"]["pod-1"]})  # the stale copy unloaded
    assert cv.adapters_here("base", "pod-0") == 1 and not bases.releasable(cv, bases.held(cv))
    # A single pod: nowhere else to go. It is not unloaded first (its requests would wait for a
    # copy that cannot go elsewhere): the leader tries again later, and it keeps answering.
    lone = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"))
    del lone.pods["pod-1"]
    lone.set_model(policy.ModelView("base2", "sentence-transformers", 90 * MB))
    lone.set_model(replace(lone.models["a1"], base="base2"))
    assert [(a.op, a.pod) for a in cp.plan_copies(lone, {}, now=100.0, tuning=Tuning(), last_added={})] == [("rebase", "pod-0")]
    assert policy.place(lone.models["a1"], lone, now=100.0).pod is None


def test_a_held_base_asked_for_again_serves_again_where_it_is() -> None:
    """A roll taken back (the alias moved back to v1), or a request for v1's id: its HELD copy
    is still in the runtime (no unload order went), so it is LOADED again, routed, no load."""
    cv = rolled()
    cv.set_copies("base", bases.retire(cv, "base", orders=True, now=5.0, why="superseded")[0])
    back = bases.revived(cv.copies["base"], now=9.0)
    assert back["pod-0"].state == CopyState.LOADED and back["pod-0"].size == 90 * MB
    cv.set_copies("base", back)
    assert cv.used("pod-0") == 92 * MB and not bases.held(cv)
    for a in ADAPTERS:  # the name moved back: the adapters follow it, and are over it again
        cv.set_model(replace(cv.models[a], base="base"))
    assert cv.copy_base("a1", "pod-0") == "base" and cv.adapters_here("base", "pod-0") == 2
    assert not cp.plan_copies(cv, {}, now=100.0, tuning=Tuning(), last_added={})  # nothing stale to move


def test_a_base_evicted_with_its_adapters_is_unloaded_after_them() -> None:
    """The runtime keeps a base while an adapter loaded over it is there: an adapter whose unload
    failed (or is slow) would keep the base's weights after the base's own unload, unbooked.
    So in one eviction the adapters' orders go now and the base's once they are confirmed; its
    bytes count as being freed meanwhile (the load that evicted it waits for them, dispatch)."""
    cv = cluster(base=loaded(90 * MB, "pod-0"), a1=loaded(1 * MB, "pod-0"), other=loaded(150 * MB, "pod-1"))
    cv.set_model(replace(cv.models["other"], pinned=True))
    big = policy.ModelView("big", "sklearn", 150 * MB)
    cv.set_model(big)
    d = policy.place(big, cv, now=10.0)
    assert d.pod == "pod-0" and d.evict == ["a1", "base"]
    sent = []
    for v in d.evict:  # as decisions.py applies them, in order
        c, now_too = bases.evicted(cv, v, "pod-0", cv.copies[v]["pod-0"], 10.0, "evicted to make room for big")
        cv.set_copies(v, {"pod-0": c})
        sent += [v] if now_too else []
    assert sent == ["a1"] and bases.held(cv) == {("base", "pod-0")}
    assert cv.used("pod-0") == 0 and cv.unloading("pod-0") == 91 * MB
    assert bases.releasable(cv, bases.held(cv)) == []  # a1's unload not confirmed yet (or failed)
    cv.set_copies("a1", {})
    assert bases.releasable(cv, bases.held(cv)) == [("base", "pod-0")]
    assert "evicted to make room for big" in bases.released(cv.copies["base"]["pod-0"]).reason


def test_a_pod_back_after_a_roll_keeps_the_older_version_it_holds_for_its_adapters() -> None:
    """A pod that was away while the base rolled registers again holding an adapter and v1: the
    adapter may be over v1 (its runtime loaded it before the roll), so it counts for v1."""
    cv = cluster(base2=loaded(90 * MB, "pod-1"))
    cv.set_model(policy.ModelView("base2", "sentence-transformers", 90 * MB))
    cv.set_model(replace(cv.models["a1"], base="base2"))
    cv.set_copies("a1", {"pod-0": Copy(CopyState.LOADED, 1 * MB, 1.0)})  # adopted back
    cv.set_copies("base", {"pod-0": Copy(CopyState.UNLOADING, 90 * MB, 1.0, "placed elsewhere meanwhile")})
    over = bases.adopted_over(cv, "pod-0", {"a1", "base"}, {"base": "minilm", "base2": "minilm", "a1": "a1"}, {"a1": "minilm"})
    assert over == [("a1", "base")]
    cv.hold_over("a1", "pod-0", "base")
    c, now_too = bases.evicted(cv, "base", "pod-0", cv.copies["base"]["pod-0"], 1.0, "placed elsewhere meanwhile")
    assert not now_too and bases.waits_for_adapters(c)
