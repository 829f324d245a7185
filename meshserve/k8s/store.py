"""The controller's reads and writes of the registry, through meshserve.state's schema.

Registration is `State.register_models`, the same call embedded mode makes for mesh-config/.
"""

from __future__ import annotations

from typing import Sequence

from meshserve import state as st
from meshserve.model import ModelSpec


async def remove_aliases(state: st.State, aliases: Sequence[str]) -> int:
    """Drop aliases (a deleted InferenceService), in one commit so the xDS servers see it.
    The concrete models stay registered: copies already loaded age out by LRU instead of
    failing requests that name the concrete id."""
    if not aliases:
        return await state.rev()
    return await state.commit([["HDEL", st.ALIASES, *aliases]], [(st.KIND_ALIAS, a) for a in aliases])


async def alias_specs(state: st.State) -> dict[str, ModelSpec]:
    """alias -> the spec it points at (aliases whose model is missing are left out)."""
    aliases = {k.decode(): v.decode() for k, v in (await state.r.hgetall(st.ALIASES)).items()}
    if not aliases:
        return {}
    ids = sorted(set(aliases.values()))
    raws = await state.r.hmget(st.MODELS, ids)
    specs = {i: ModelSpec.from_json(raw) for i, raw in zip(ids, raws) if raw}
    return {a: specs[i] for a, i in aliases.items() if i in specs}
