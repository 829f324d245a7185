"""Kind: state (a real Valkey). The xDS resync reads what routing needs at one revision: the
registered ids without their specs (at a million models the specs were most of a resync),
and aliases, pods and placements as `State.snapshot` reads them."""

from __future__ import annotations

import asyncio

from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve.store import State, keys
from meshserve.store.messages import KIND_ALL
from meshserve_testing import devmesh
from meshserve_xds.source import read_snapshot


def test_a_resync_reads_ids_aliases_pods_and_placements_as_the_store_does() -> None:
    async def go(url: str) -> None:
        s = State.from_url(url)
        try:
            pod = Pod("p0", "127.0.0.1", 1, 2, 1 << 30)
            specs = [ModelSpec(f"m{i}__isvc-{i:010x}", f"m{i}", "sklearn", {}) for i in range(3)]
            await s.commit([["HSET", keys.PODS, pod.id, pod.to_json()],
                            *[["HSET", keys.MODELS, m.id, m.to_json()] for m in specs],
                            *[["HSET", keys.ALIASES, m.alias, m.id] for m in specs],
                            ["HSET", keys.PLACEMENTS, specs[0].id, copies_to_json({"p0": Copy(CopyState.LOADED)})],
                            # a spec the xDS server cannot parse still registers its id
                            ["HSET", keys.MODELS, "odd", "not json"]], [(KIND_ALL, "")])
            got = await read_snapshot(s)
            await s.r.hdel(keys.MODELS, "odd")
            full = await s.snapshot()
        finally:
            await s.close()
        assert set(got.models) == set(full.models) | {"odd"}
        assert (got.rev, got.aliases, got.pods, got.placements) == (full.rev, full.aliases, full.pods, full.placements)

    with devmesh.valkey() as v:
        asyncio.run(go(v.url))
