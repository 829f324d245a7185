"""Kind: unit (pure). The request counts behind the rates: a full poll sets the baseline (no
requests counted for a pair seen the first time), a partial poll (stats?since=) reports only the
models used since, so a pair it leaves out keeps its count and a pair new to it counts from 0."""

from __future__ import annotations

from meshserve_placement.rates import count, ewma


def test_a_partial_poll_counts_only_what_it_reports_and_keeps_the_rest() -> None:
    full = [("p0", {"a": {"requests": 5, "last_used": 10.0}, "b": {"requests": 0}}), ("p1", {"a": {"requests": 2, "last_used": 9.0}})]
    counts, deltas, _ = count({}, full)
    assert counts == {("p0", "a"): 5, ("p0", "b"): 0, ("p1", "a"): 2} and deltas == {}  # a baseline only
    # p0 answers a partial poll: a used 3 times more, c loaded and used twice since; b unused, left out.
    # p1 answers in full (a runtime that ignores ?since=, or its periodic full poll).
    polled = [("p0", {"a": {"requests": 8, "last_used": 20.0}, "c": {"requests": 2, "last_used": 19.0}}),
              ("p1", {"a": {"requests": 4, "last_used": 18.0}})]
    counts, deltas, used = count(counts, polled, partial={"p0"})
    assert counts == {("p0", "a"): 8, ("p0", "b"): 0, ("p0", "c"): 2, ("p1", "a"): 4}
    assert deltas == {"a": 5, "c": 2} and used == {"a": (20.0, 5), "c": (19.0, 2)}
    assert ewma({}, deltas, 2.0, first=True) == {"a": 2.5, "c": 1.0}
    # A runtime that restarted reports lower counters: no requests, the new count remembered.
    counts, deltas, _ = count(counts, [("p0", {"a": {"requests": 1, "last_used": 30.0}})], partial={"p0"})
    assert deltas == {} and counts[("p0", "a")] == 1
    # A pod not polled at all (gone, or its poll failed) loses its pairs: its next poll is full.
    counts, _, _ = count(counts, [("p0", {})], partial={"p0"})
    assert all(pod == "p0" for pod, _ in counts)
