"""Issue 19 §2: what placement books for a copy, decided in one pure function
(meshserve_placement.sizes.booked_size) that the leader and the simulator share.

Kind: unit (pure, in memory).
"""

from __future__ import annotations

from bench import placement_sim as sim
from meshserve.model import Copy, CopyState, ModelSpec, Pod
from meshserve.store.state import PlacedSnapshot
from meshserve_placement import policy, reload
from meshserve_placement.sizes import UNKNOWN_MODEL_BYTES, booked_size, reported_of
from meshserve_placement.specs import Specs

MiB = 1 << 20


def _spec(name: str, size_hint: int = 0, predicted: int = 0) -> ModelSpec:
    return ModelSpec(id=f"{name}__isvc-0000000000", alias=name, format="sklearn", storage={}, size_hint=size_hint, predicted_size=predicted)


def test_booked_size_prefers_reported_then_stated_then_unknown() -> None:
    assert booked_size(0) == UNKNOWN_MODEL_BYTES  # never loaded, nothing stated
    assert booked_size(512 * MiB) == 512 * MiB  # stated (meshserve.io/memory)
    assert booked_size(0, reported=496_557) == 496_557  # a load reported it
    assert booked_size(496_557, reported=496_557) == 496_557
    # A stated size raised after the last load counts at once; the report never books less.
    assert booked_size(2 * MiB, reported=496_557) == 2 * MiB
    assert booked_size(0, reported=0, unknown=1) == 1
    assert reported_of([]) == 0 and reported_of([0, 496_557, 400_000]) == 496_557


def test_a_prediction_from_the_files_stands_in_until_a_report_or_a_stated_size() -> None:
    assert booked_size(0, predicted=496_557) == 496_557  # listed at registration, never loaded
    assert booked_size(0, reported=500_000, predicted=496_557) == 500_000  # the load's report wins
    assert booked_size(2 * MiB, predicted=496_557) == 2 * MiB  # so does what the user stated
    assert reload._model_view(_spec("a", predicted=496_557)).size == 496_557


def test_the_leader_books_through_it() -> None:
    # Before, a model with no hint booked 64 MiB whatever its loads had reported.
    assert reload._model_view(_spec("a")).size == booked_size(0)
    assert reload._model_view(_spec("a"), reported=496_557).size == 496_557
    assert reload._model_view(_spec("b", 3 * MiB)).size == 3 * MiB
    # A leader that takes over remembers reported sizes from the LOADED copies it finds, not the
    # placeholder a LOADING copy was booked at.
    a, b = _spec("a"), _spec("b")
    snap = PlacedSnapshot(rev=1, pods={"p": Pod("p", "127.0.0.1", 1, 2, 8 * MiB, ["sklearn"])},
                          placements={a.id: {"p": Copy(CopyState.LOADED, 496_557)}, b.id: {"p": Copy(CopyState.LOADING, UNKNOWN_MODEL_BYTES)}})
    models, adapters = reload._model_views(Specs({a.id.encode(): a.to_json().encode(), b.id.encode(): b.to_json().encode()}), snap.placements)
    assert adapters == []
    view = reload._build_view(snap, models, [], {}, 60.0)
    assert view.models[a.id].size == 496_557
    assert view.models[b.id].size == UNKNOWN_MODEL_BYTES


def test_a_small_pod_takes_a_model_once_its_size_is_known() -> None:
    """The issue's symptom: on a 4 MiB pod an unsized model 'needs 67108864 bytes, more than the
    pod's whole capacity'. Stated or reported, its real size fits."""
    pods = {"p": policy.PodView("p", 4 * MiB, ["sklearn"])}
    view = policy.ClusterView(pods=pods, models={})
    unsized = reload._model_view(_spec("a"))
    view.set_model(unsized)
    assert policy.place(unsized, view, 0.0).pod is None
    stated = reload._model_view(_spec("b", 600_000))
    view.set_model(stated)
    assert policy.place(stated, view, 0.0).pod == "p"
    known = reload._model_view(_spec("a"), reported=496_557)
    view.set_model(known)
    assert policy.place(known, view, 0.0).pod == "p"
    predicted = reload._model_view(_spec("c", predicted=496_557))  # its files listed at registration
    view.set_model(predicted)
    assert policy.place(predicted, view, 0.0).pod == "p"


def test_the_simulator_books_what_the_leader_books() -> None:
    # One model of 300 MiB on pods of 1 GiB: the simulator's first decision books what the
    # leader books for a never-loaded model, the copy what the load reported.
    w = sim.Workload([300 * MiB], [0, 0], 1.0, 0)
    r = sim.simulate_policy(w, pods=1, capacity=1 << 30)
    assert r.extra["rejected"] == 0
    booked: list[int] = []
    orig = policy.place

    def spy(mv: policy.ModelView, view: policy.ClusterView, now: float) -> policy.Decision:
        booked.append(mv.size)
        return orig(mv, view, now)

    sim.policy.place = spy  # type: ignore[assignment]
    try:
        sim.simulate_policy(sim.Workload([300 * MiB, 2 * MiB], [0, 1], 1.0, 0), pods=1, capacity=1 << 30)
    finally:
        sim.policy.place = orig  # type: ignore[assignment]
    assert booked == [reload._model_view(_spec("x")).size] * 2
