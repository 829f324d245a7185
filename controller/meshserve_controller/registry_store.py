"""The controller's reads and writes of the registry, through the store (meshserve/store).

Registration is `State.register_models`, the same call embedded mode makes for mesh-config/.
"""

from __future__ import annotations

from typing import Sequence

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store import messages
from meshserve.store.state import State
from meshserve.model import ModelSpec


async def remove_aliases(state: State, aliases: Sequence[str]) -> int:
    """Drop aliases (a deleted InferenceService), in one commit so the xDS servers see it.
    The concrete models stay registered: copies already loaded age out by LRU instead of
    failing requests that name the concrete id."""
    if not aliases:
        return await state.rev()
    return await state.commit([store_ops.del_aliases(*aliases)], [(messages.KIND_ALIAS, a) for a in aliases])


async def alias_specs(state: State) -> dict[str, ModelSpec]:
    """alias -> the spec it points at (aliases whose model is missing are left out)."""
    aliases = {k.decode(): v.decode() for k, v in (await state.r.hgetall(keys.ALIASES)).items()}
    if not aliases:
        return {}
    ids = sorted(set(aliases.values()))
    raws = await state.r.hmget(keys.MODELS, ids)
    specs = {i: ModelSpec.from_json(raw) for i, raw in zip(ids, raws) if raw}
    return {a: specs[i] for a, i in aliases.items() if i in specs}
