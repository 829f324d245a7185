"""Two `meshserve up` meshes at once, as two test sessions on one machine start them: each is
told its ports from its own reserved block (meshserve/ports.py), so neither fails to bind and
each gateway answers. Kind: e2e (real Valkey, Envoy, runtimes; both stopped at the end)."""

from __future__ import annotations

import pytest

from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e


def test_two_meshes_at_once_each_on_ports_of_its_own() -> None:
    with devmesh.mesh(pods=1) as a, devmesh.mesh(pods=1) as b:
        def used(m: devmesh.Mesh) -> set[int]:
            rt = m.ports["runtime_base_port"]
            return {v for k, v in m.ports.items() if k != "runtime_base_port"} | set(range(rt, rt + 10))

        assert used(a).isdisjoint(used(b))
        for m in (a, b):
            status, body = devmesh.http_get(m.rest + "/v2", 10)
            assert status == 200, body
