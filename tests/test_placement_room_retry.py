"""Kind: unit test of the placement leader over the in-memory store fake (tests/placement_fakes.py).

Issue 19 §3, the runaway Zipf run: every load request, load or unload result and 0.25 s tick
retries the models waiting for room, and each retry was a whole decision per waiting model.
With hundreds waiting that is quadratic, and it saturated the leader on 2 cores (a "later"
decision costs ~170 µs with 30 copies a pod: 200 waiting × ~140 passes/s is seconds of CPU per
second). Models of the same runtime, format and size get the same verdict from the same view,
so a pass decides each such class once."""

from __future__ import annotations

from typing import Any

from meshserve.model import CopyState
from meshserve.store.messages import LoadRequest
from meshserve_placement import decisions
from tests.test_placement_findings import MB, _handle, _leader


async def test_a_pass_over_models_waiting_for_room_decides_each_kind_once(monkeypatch: Any) -> None:
    waiting = [f"w{i}" for i in range(20)]
    # Room counted to the byte: no unload reserve.
    r, sched = await _leader({"p0": 2 * MB}, {"a": MB, "b": MB, "big": 2 * MB, **{w: MB for w in waiting}}, unload_reserve_fraction=0.0)
    for m in ("a", "b", *waiting, "big"):
        await _handle(sched, sched._on_load_request(LoadRequest(m).encode()))
    # a and b are loading (their room frees once they land): everyone else waits, no 503.
    assert {m for m, cs in sched.view.copies.items() if any(c.state == CopyState.LOADING for c in cs.values())} == {"a", "b"}
    assert set(sched.room) == {*waiting, "big"}
    calls: list[str] = []
    place = decisions.place

    def counting(mv: Any, view: Any, now: float) -> Any:
        calls.append(mv.id)
        return place(mv, view, now)

    monkeypatch.setattr(decisions, "place", counting)  # the name the retry pass calls
    await _handle(sched, sched._retry_room())
    # One decision for the 1 MB kind (the oldest waiter), one for the 2 MB one: not 21.
    assert calls == ["w0", "big"], calls
    assert set(sched.room) == {*waiting, "big"}
