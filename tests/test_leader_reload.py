"""Kind: real Valkey, the placement leader's reload in-process. A reload builds the view of the
models the leader has a use for (copies, pins, queued loads, adapters' bases), keeps their specs
as the bytes Redis holds, and a walk over the registry after it adds the models that must keep
copies without having any; every other model joins when it is asked for (issue 19: a million
registered models took 53 s and 2 GiB to reload)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import pytest

from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve.store import State, keys
from meshserve_placement import specs as specs_mod
from meshserve_placement.leader import Scheduler
from meshserve_placement.specs import Specs, view_fields
from meshserve_testing import devmesh

MB = 1 << 20


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


def _spec(name: str, **kw: Any) -> ModelSpec:
    return ModelSpec(id=f"{name}__isvc-0", alias=name, format="sklearn", storage={"path": name}, size_hint=MB, **kw)


@contextlib.asynccontextmanager
async def _rebuilt(url: str) -> AsyncIterator[tuple[State, dict[str, ModelSpec], Scheduler]]:
    """The registry of `_fill` and a leader that has just rebuilt its view of it."""
    state = State.from_url(url)
    try:
        s = await _fill(state)
        leader = Scheduler(Settings(redis_url=url), state)
        await leader._rebuild()
        yield state, s, leader
    finally:
        await state.close()


async def _fill(state: State) -> dict[str, ModelSpec]:
    s = {sp.alias: sp for sp in [
        _spec("loaded"), _spec("minc", min_copies=2), _spec("pinned", pinned=True), _spec("base"),
        _spec("adapter", base="base"), _spec("apinned"), *[_spec(f"plain{i}") for i in range(20)],
    ]}
    await state.r.flushdb()
    await state.register_models(list(s.values()))
    pod = Pod("p0", "127.0.0.1", 1, 2, 100 * MB, ["sklearn"])
    await state.r.hset(keys.PODS, pod.id, pod.to_json())
    await state.r.zadd(keys.HEARTBEATS, {pod.id: 1e12})
    copy = copies_to_json({"p0": Copy(CopyState.LOADED, 3 * MB, 1.0)})
    await state.r.hset(keys.PLACEMENTS, mapping={s["loaded"].id: copy, s["adapter"].id: copy})
    await state.r.hset(keys.PINS, s["apinned"].id, "1")  # pinned through the repository API
    return s


def test_a_reload_holds_the_models_in_use_and_the_walk_adds_those_to_keep(valkey: Any) -> None:
    async def go() -> None:
        async with _rebuilt(valkey.url) as (state, s, leader):
            ids = {n: sp.id for n, sp in s.items()}
            v = leader.view
            assert set(v.models) == {ids["loaded"], ids["adapter"], ids["base"], ids["apinned"]}
            assert v.models[ids["loaded"]].size == 3 * MB  # the reported size, from its copy
            assert v.models[ids["adapter"]].base == ids["base"]  # its alias resolved
            assert v.models[ids["apinned"]].pinned
            assert leader.aliases == {"base": ids["base"]}  # only the names adapters use
            assert leader.specs[ids["loaded"]] == s["loaded"]  # parsed from Redis's bytes when asked
            assert ids["plain0"] not in leader.specs

            await leader._find_kept()  # what `_walk_registry` runs after each rebuild
            assert {ids["minc"], ids["pinned"]} <= set(v.models)
            assert v.models[ids["minc"]].min_copies == 2 and v.models[ids["pinned"]].pinned
            assert not any(ids[f"plain{i}"] in v.models for i in range(20))

            spec = await leader._refresh_model_and_pods(ids["plain3"])  # a request for it
            assert spec == s["plain3"] and ids["plain3"] in v.models and leader.specs[ids["plain3"]] == spec

    asyncio.run(go())


def test_the_views_fields_are_the_specs() -> None:
    sp = _spec("a", min_copies=1, max_copies=3, pinned=True, runtime="rt", base="b", predicted_size=7)
    f = view_fields(sp.to_json().encode())
    assert f == view_fields(sp) == (sp.format, sp.size_hint, sp.predicted_size, True, 1, 3, "rt", "b")
    # A field of a type the fast decoder refuses is read as the kernel reads it.
    raw = sp.to_json().replace('"size_hint":1048576', '"size_hint":1048576.0').encode()
    assert view_fields(raw).size_hint == ModelSpec.from_json(raw).size_hint
    # A spec written by an older version, without the newer fields.
    old = b'{"alias":"o","format":"sklearn","id":"o__isvc-0","storage":{}}'
    assert view_fields(old) == ("sklearn", 0, 0, False, 0, 0, "", "")


def test_specs_parse_on_access_and_keep_what_is_set() -> None:
    a, b = _spec("a"), _spec("b")
    st = Specs({a.id.encode(): a.to_json().encode()})
    assert st[a.id] == a and st.get(b.id) is None and a.id in st and b.id not in st and 1 not in st
    assert st[a.id] is not st[a.id]  # a fresh object each read: nobody changes another's
    st[b.id] = b
    assert st[b.id] is b and sorted(st) == sorted([a.id, b.id]) and len(st) == 2
    del st[a.id]
    assert list(st) == [b.id]


def test_the_fields_without_msgspec(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = _spec("a", min_copies=1, base="b")
    fast = view_fields(sp.to_json().encode())
    monkeypatch.setattr(specs_mod, "msgspec", None)
    assert specs_mod.view_fields(sp.to_json().encode()) == fast


def test_a_revision_gap_refreshes_the_view_not_the_registry(valkey: Any) -> None:
    """Changes trimmed away: the leader re-reads the registry (in chunks) but takes into its
    view only the models it holds and those that must keep copies."""

    async def go() -> None:
        async with _rebuilt(valkey.url) as (state, s, leader):
            bigger = ModelSpec(**{**s["apinned"].__dict__, "max_copies": 4})
            await state.register_models([bigger, _spec("newplain"), _spec("newkept", min_copies=1)])
            leader._changes_rev -= 5  # as if entries were trimmed: a gap
            await leader._refresh_specs()
            v = leader.view
            assert v.models[bigger.id].max_copies == 4 and v.models[bigger.id].pinned  # still pinned by the API
            assert _spec("newkept").id in v.models and _spec("newplain").id not in v.models

    asyncio.run(go())


def test_a_pod_that_registers_again_keeps_a_model_the_reload_left_out(valkey: Any) -> None:
    """A model without copies is not in a new leader's view; a pod that comes back holding it
    (withdrawn while its loader was paused) keeps it, as for any registered model, rather than
    having it unloaded as 'no longer registered'."""

    async def go() -> None:
        async with _rebuilt(valkey.url) as (state, s, leader):
            plain, gone = s["plain1"].id, "unregistered__isvc-0"
            assert plain not in leader.view.models
            await state.r.set(keys.LEASE, leader.id)  # its commits are fenced by the lease
            async with leader._deciding():
                await leader._reconcile_pod("p0", {plain: MB, gone: MB})
            assert leader.view.copies[plain]["p0"].state == CopyState.LOADED and plain in leader.view.models
            assert leader.view.copies[gone]["p0"].state == CopyState.UNLOADING  # not registered: unloaded

    asyncio.run(go())
