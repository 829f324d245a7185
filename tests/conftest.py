"""Fixtures shared by the store's integration tests: a real Valkey per module, and a `State`
on it emptied before each test. A test module that needs another kind defines its own (a
module's fixture of the same name wins)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

import pytest

from meshserve.store.state import State
from meshserve_testing import devmesh


@pytest.fixture(scope="module")
def valkey() -> Iterator[Any]:
    with devmesh.valkey() as v:
        yield v


@pytest.fixture
async def state(valkey: Any) -> AsyncIterator[State]:
    s = State.from_url(valkey.url)
    await s.r.flushall()
    try:
        yield s
    finally:
        await s.close()
