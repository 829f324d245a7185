"""Kind: integration (a real Valkey, from devmesh; fixtures in conftest.py). The one Lease helper
(meshserve/store/lease.py) every leader-elected process holds: one holder at a time, a lapsed
holder never extends it back, its keeper says when it is lost, and a write fenced by it fails
whole once it is lost (the rollout controller's writes, issue 15)."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store.lease import Lease
from meshserve.store.state import NotLeader, State


async def test_one_holder_at_a_time_and_a_lapsed_one_never_takes_it_back(state: State) -> None:
    a = Lease(state.r, keys.ROLLOUT_LEASE, "a", 0.3)
    b = Lease(state.r, keys.ROLLOUT_LEASE, "b", 0.3)
    assert await a.hold() and not await b.hold()
    assert await a.hold()  # renewed
    await asyncio.sleep(0.45)  # a lapses
    assert await b.hold()
    assert not await a.renew() and not await a.hold()
    assert (await state.r.get(keys.ROLLOUT_LEASE)) == b"b"


async def test_the_keeper_renews_and_says_when_the_lease_is_lost(state: State) -> None:
    a = Lease(state.r, keys.ROLLOUT_LEASE, "a", 0.3)
    assert await a.hold()
    async with a.kept() as lost:
        await asyncio.sleep(0.7)  # longer than the lease: only the keeper keeps it
        assert not lost.is_set() and (await state.r.get(keys.ROLLOUT_LEASE)) == b"a"
        await state.r.set(keys.ROLLOUT_LEASE, "b", px=5000)  # another holder took over
        await asyncio.wait_for(lost.wait(), 1.0)
    assert (await state.r.get(keys.ROLLOUT_LEASE)) == b"b"


async def test_a_write_fenced_by_a_lost_lease_fails_whole(state: State) -> None:
    a = Lease(state.r, keys.ROLLOUT_LEASE, "rollout-a", 5.0)
    assert await a.hold()
    fence = {"fence": "rollout-a", "lease": keys.ROLLOUT_LEASE}
    await state.commit([store_ops.set_alias("m", "m__1")], [("alias", "m")], **fence)
    await state.r.set(keys.ROLLOUT_LEASE, "rollout-b", px=5000)
    rev = await state.rev()
    with pytest.raises(NotLeader):
        await state.commit([store_ops.set_alias("m", "m__2")], [("alias", "m")], **fence)
    assert await state.resolve("m") == "m__1" and await state.rev() == rev


async def test_the_lease_is_kept_while_the_event_loop_stalls_and_let_go_when_it_stays_stuck(state: State) -> None:
    """A leader reloading 100,000 models on a starved machine blocked its event loop for longer
    than its lease, lost it on every reload and reloaded again (bench/density.py). The keeper
    now renews from its own thread; a loop stuck past `stall` still loses the lease."""
    a = Lease(state.r, keys.ROLLOUT_LEASE, "a", 0.3)
    assert await a.hold()
    async with a.kept(stall=1.0) as lost:
        time.sleep(0.8)  # the loop blocked for well over the lease
        await asyncio.sleep(0.05)
        assert not lost.is_set() and (await state.r.get(keys.ROLLOUT_LEASE)) == b"a"
        time.sleep(1.6)  # stuck past the stall limit: the keeper lets it go
        await asyncio.wait_for(lost.wait(), 2.0)
    assert not await a.renew()
