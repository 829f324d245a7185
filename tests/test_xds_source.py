"""Kind: unit (pure, and the reconnect loop against an in-memory stand-in for Redis). How the
xDS source reads a batch of `ms:changes` entries: targeted re-reads by kind and id, and a full
resync on any revision gap or unknown kind; how it picks its layout and reconnects."""

from __future__ import annotations

from meshserve.store import messages as st
from meshserve.store.messages import Change
from meshserve_xds.source import plan_batch


def entry(rev: int, kind: str, id_: str) -> tuple[bytes, Change]:
    return (f"{rev}-0".encode(), Change(rev, kind, id_))


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


class _RedisGone:
    """Stands in for st.State while Redis is unreachable (in-memory fake: every call fails)."""

    async def last_change_id(self) -> bytes:
        raise ConnectionError("Connection refused")


def test_reconnects_back_off_exponentially_with_jitter() -> None:
    """While Redis is away the source retries with growing, jittered waits (was a fixed 1 s),
    capped, and keeps serving the last snapshot meanwhile."""
    import asyncio

    from meshserve.settings import Settings
    from meshserve_xds.cache import SnapshotCache
    from meshserve_xds.source import RedisSource

    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) >= 12:
            raise asyncio.CancelledError

    src = RedisSource(Settings(), _RedisGone(), SnapshotCache())  # type: ignore[arg-type]
    src.sleep = sleep
    try:
        asyncio.run(src.run())
    except asyncio.CancelledError:
        pass
    assert len(waits) == 12
    assert waits[0] < 1.2 and waits[-1] > 5 and max(waits) <= 11  # 0.1 s doubling to 10 s, plus up to 1 s
    assert len(set(waits)) == len(waits)  # jittered: replicas that lost Redis together do not retry in step


def test_the_source_holds_one_layout_object_per_group() -> None:
    """MESHSERVE_XDS_LAYOUT picks the gateway's layout from the table; a bad name says which
    values exist."""
    import pytest

    from meshserve.settings import Settings
    from meshserve_xds.cache import SnapshotCache
    from meshserve_xds.matcher import MatcherLayout
    from meshserve_xds.scoped import ScopedLayout
    from meshserve_xds.source import RedisSource

    assert isinstance(RedisSource(Settings(), None, SnapshotCache()).layout, ScopedLayout)  # type: ignore[arg-type]
    assert isinstance(RedisSource(Settings(), None, SnapshotCache(), layout="matcher").layout, MatcherLayout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scoped, matcher"):
        RedisSource(Settings(), None, SnapshotCache(), layout="trie")  # type: ignore[arg-type]


def test_aliases_by_model_keeps_one_alias_as_a_string_and_several_as_a_set() -> None:
    from meshserve_xds import source as s

    m = s.aliases_by_model({"a": "m1", "b": "m2", "c": "m2", "d": "m3", "e": "m2"})
    assert m == {"m1": "a", "m2": {"b", "c", "e"}, "m3": "d"}
    assert set(s._aliases_of(m, "m2")) == {"b", "c", "e"} and s._aliases_of(m, "m1") == ("a",) and s._aliases_of(m, "x") == ()
    s._add_alias(m, "m1", "a")  # already there: unchanged
    s._add_alias(m, "m1", "f")
    s._add_alias(m, "m4", "g")
    s._drop_alias(m, "m3", "d")
    s._drop_alias(m, "m3", "d")
    s._drop_alias(m, "m2", "c")
    assert m == {"m1": {"a", "f"}, "m2": {"b", "e"}, "m4": "g"}


def test_entries_at_or_below_the_snapshot_mark_the_batch_behind() -> None:
    """Normal just after a resync; after Redis lost its data it is how the source learns that
    the revision started again (it then asks Redis for its revision and resyncs if lower)."""
    assert plan_batch(12, [entry(3, st.KIND_POD, "p")]).behind
    assert not plan_batch(12, [entry(13, st.KIND_POD, "p")]).behind
