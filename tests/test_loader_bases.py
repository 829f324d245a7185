"""Kind: real Valkey, real local fetcher (a PVC folder). The base an adapter's load names: by
the id placement booked it is read from Redis once per pod; by an InferenceService name (which
can move to a new version) every time, so a base rolled to a new version is the one loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from meshserve.model import ModelSpec
from meshserve.settings import Settings
from meshserve.store import State, keys
from meshserve_loader.bases import Bases
from meshserve_loader.fetch import make_fetcher
from meshserve_testing import devmesh


@pytest.fixture(scope="module")
def valkey() -> Any:
    with devmesh.valkey() as v:
        yield v


def _spec(model_id: str, folder: str, fmt: str, base: str = "") -> ModelSpec:
    return ModelSpec(id=model_id, alias=model_id.split("__")[0], format=fmt, base=base,
                     storage={"parameters": {"type": "pvc", "name": "vol"}, "path": folder})


@pytest.fixture
async def bases(valkey: Any, tmp_path: Path) -> AsyncIterator[Bases]:
    for folder in ("minilm-v1", "minilm-v2", "adapter"):
        (tmp_path / "pvc" / "vol" / folder).mkdir(parents=True)
        (tmp_path / "pvc" / "vol" / folder / "weights.bin").write_bytes(b"\0" * 1000)
    state = State.from_url(valkey.url)
    await state.r.flushdb()
    try:
        yield Bases(state, make_fetcher(Settings(data_dir=tmp_path, redis_url=valkey.url), "pod-0"))
    finally:
        await state.close()


async def test_a_base_named_by_id_is_read_once(bases: Bases) -> None:
    v1 = _spec("minilm__isvc-0000000001", "minilm-v1", "sentence-transformers")
    await bases.state.register_models([v1])
    adapter = _spec("a0__isvc-00000000a0", "adapter", "peft", base=v1.id)
    first = await bases.params(adapter, None)
    assert first["base_model"] == v1.id and first["base_path"].endswith("minilm-v1")
    assert first["base_predicted_size"] > 1000
    # The id's registration gone from Redis: the next adapter's load over it still resolves it
    # (an id's spec never changes), with no round trip.
    await bases.state.r.hdel(keys.MODELS, v1.id)
    again = await bases.params(_spec("a1__isvc-00000000a1", "adapter", "peft", base=v1.id), None)
    assert again == first


async def test_a_base_named_by_its_isvc_follows_a_new_version(bases: Bases) -> None:
    v1 = _spec("minilm__isvc-0000000001", "minilm-v1", "sentence-transformers")
    await bases.state.register_models([v1])
    adapter = _spec("a0__isvc-00000000a0", "adapter", "peft", base="minilm")
    assert (await bases.params(adapter, None))["base_model"] == v1.id
    v2 = _spec("minilm__isvc-0000000002", "minilm-v2", "sentence-transformers")
    await bases.state.register_models([v2])
    now = await bases.params(adapter, None)
    assert now["base_model"] == v2.id and now["base_path"].endswith("minilm-v2")


async def test_an_unknown_base_is_named_in_the_error(bases: Bases) -> None:
    with pytest.raises(ValueError, match="base model 'nobase' is not registered"):
        await bases.params(_spec("a0__isvc-00000000a0", "adapter", "peft", base="nobase"), None)
    # And not remembered as missing: registered now, found now.
    await bases.state.register_models([_spec("nobase__isvc-0000000003", "minilm-v1", "sentence-transformers")])
    assert (await bases.params(_spec("a0__isvc-00000000a0", "adapter", "peft", base="nobase"), None))["base_path"].endswith("minilm-v1")
