"""An adapter's base model (issue 17): which registered model it names, fetched like any model,
for the runtime to load once and share between its adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshserve.model import ModelSpec
from meshserve.registry import ADAPTER_CONFIG, base_from_adapter_config
from meshserve.store import State
from meshserve.yamlfile import ConfigError
from meshserve_loader.fetch import Fetcher
from meshserve_loader.storage import predict_size


async def base_params(state: State, fetcher: Fetcher, spec: ModelSpec, path: Path | None) -> dict[str, Any]:
    """An adapter's base (issue 17): the registered model its spec names (meshserve.io/
    base-model), else the one its PEFT adapter_config.json names, fetched like any model, for
    the runtime to load once and share (`base_path`). {} for a model without a base.

    Placement loads the base's own model on the pod before an adapter whose spec names it
    (issue 17 item 2), so the fetch finds it in the disk cache and the runtime finds it
    resident. A base named only in adapter_config.json is unknown to placement: it is fetched
    here and its memory is carried by the adapter that brought it (builtin/table.py `load_with_base`).
    `path`, the adapter's own files, is read only when the spec names no base (None: not yet
    fetched; then only the spec's base counts)."""
    name = spec.base
    if not name:
        if path is None:
            return {}
        cfg = (path if path.is_dir() else path.parent) / ADAPTER_CONFIG
        if not cfg.is_file():
            return {}
        try:
            name = base_from_adapter_config(cfg.read_text(), f"{spec.alias}/{ADAPTER_CONFIG}")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if not name:
            return {}
    base = await state.resolve_model(name)
    if base is None:
        raise ValueError(f"{spec.alias}'s base model '{name}' is not registered: register it (an InferenceService named {name!r})")
    if base.base:
        raise ValueError(f"{spec.alias}'s base '{name}' is itself an adapter (of '{base.base}'): a base must be a full model")
    base_path = await fetcher.fetch(base.storage)
    return {"base_path": str(base_path), "base_format": base.format, "base_model": base.id,
            "base_predicted_size": base.size_hint or predict_size(base_path, base.format)}
