"""Kind: unit (pure). How the xDS source reads a batch of `ms:changes` entries: targeted
re-reads by kind and id, and a full resync on any revision gap or unknown kind."""

from __future__ import annotations

from meshserve import state as st
from meshserve_xds.source import plan_batch


def entry(rev: int, kind: str, id_: str) -> tuple[bytes, dict[bytes, bytes]]:
    return (f"{rev}-0".encode(), {b"rev": str(rev).encode(), b"kind": kind.encode(), b"id": id_.encode()})


def test_targeted_ids_by_kind() -> None:
    b = plan_batch(10, [entry(11, st.KIND_PLACEMENT, "a"), entry(11, st.KIND_PLACEMENT, "b"), entry(12, st.KIND_POD, "p1")])
    assert not b.resync and b.rev == 12
    assert b.ids == {st.KIND_PLACEMENT: {"a", "b"}, st.KIND_POD: {"p1"}}


def test_entries_already_in_the_snapshot_are_skipped() -> None:
    b = plan_batch(12, [entry(11, st.KIND_PLACEMENT, "a"), entry(12, st.KIND_PLACEMENT, "b"), entry(13, st.KIND_ALIAS, "x")])
    assert not b.resync and b.ids == {st.KIND_ALIAS: {"x"}} and b.rev == 13


def test_a_revision_gap_resyncs() -> None:
    assert plan_batch(10, [entry(12, st.KIND_PLACEMENT, "a")]).resync
    assert plan_batch(10, [entry(11, st.KIND_PLACEMENT, "a"), entry(13, st.KIND_PLACEMENT, "b")]).resync


def test_unknown_or_all_kind_resyncs() -> None:
    assert plan_batch(1, [entry(2, st.KIND_ALL, "")]).resync
    assert plan_batch(1, [entry(2, "something-new", "z")]).resync


def test_rule_changes_are_followed_without_resync() -> None:
    b = plan_batch(1, [entry(2, st.KIND_RULE, "canary")])
    assert not b.resync and b.ids == {st.KIND_RULE: {"canary"}}
