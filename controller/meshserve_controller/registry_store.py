"""The controller's reads and writes of the registry, through the store (meshserve/store).

Registration is `State.register_models`, the same call embedded mode makes for mesh-config/.
"""

from __future__ import annotations

from meshserve.store import keys
from meshserve.store.state import State
from meshserve.model import ModelSpec


async def alias_specs(state: State) -> dict[str, ModelSpec]:
    """alias -> the spec it points at (aliases whose model is missing are left out)."""
    aliases = {k.decode(): v.decode() for k, v in (await state.r.hgetall(keys.ALIASES)).items()}
    if not aliases:
        return {}
    ids = sorted(set(aliases.values()))
    raws = await state.r.hmget(keys.MODELS, ids)
    specs = {i: ModelSpec.from_json(raw) for i, raw in zip(ids, raws) if raw}
    return {a: specs[i] for a, i in aliases.items() if i in specs}
