"""An adapter's base model (issue 17): which registered model it names, fetched like any model,
for the runtime to load once and share between its adapters."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from meshserve.model import ModelSpec
from meshserve.registry import ADAPTER_CONFIG, base_from_adapter_config
from meshserve.store import State
from meshserve.yamlfile import ConfigError
from meshserve_loader.fetch import Fetcher
from meshserve_loader.storage import predict_size

KEEP_SPECS = 256  # bases a pod's loads named lately; a cluster has a few, not hundreds


class Bases:
    """Resolves the base an adapter's load names. A load order names its base by the concrete id
    placement booked (placement bases.order_spec), and an id's spec never changes (the registry
    hashes the spec into it), so a base id is read from Redis once per pod, not once per adapter
    load: that round trip and the base's size guess were 1.2 ms of each adapter's cold start
    on a 2-core machine (docs/benchmarks.md "The base looked up once"). A name that is an
    InferenceService's (an alias: it can move to a new version) is read every time."""

    def __init__(self, state: State, fetcher: Fetcher, keep: int = KEEP_SPECS):
        self.state, self.fetcher, self.keep = state, fetcher, keep
        self._by_id: OrderedDict[str, tuple[ModelSpec, dict[str, int]]] = OrderedDict()  # id -> spec, {path: predicted size}

    async def params(self, spec: ModelSpec, path: Path | None) -> dict[str, Any]:
        """The runtime's load parameters for `spec`'s base (`base_path` and the rest): the
        registered model its spec names (meshserve.io/base-model), else the one its PEFT
        adapter_config.json names, fetched like any model, for the runtime to load once and
        share. {} for a model without a base.

        Placement loads the base's own model on the pod before an adapter whose spec names it
        (issue 17 item 2), so the fetch finds it in the disk cache and the runtime finds it
        resident. A base named only in adapter_config.json is unknown to placement: it is
        fetched here and its memory is carried by the adapter that brought it
        (builtin/table.py `load_with_base`). `path`, the adapter's own files, is read only when
        the spec names no base (None: not yet fetched; then only the spec's base counts)."""
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
        base, sizes = await self._spec(name)
        if base is None:
            raise ValueError(f"{spec.alias}'s base model '{name}' is not registered: register it (an InferenceService named {name!r})")
        if base.base:
            raise ValueError(f"{spec.alias}'s base '{name}' is itself an adapter (of '{base.base}'): a base must be a full model")
        # Fetched every time: the disk cache may have dropped the files since.
        base_path = await self.fetcher.fetch(base.storage)
        key = str(base_path)
        if key not in sizes:
            sizes[key] = base.size_hint or predict_size(base_path, base.format)
        return {"base_path": key, "base_format": base.format, "base_model": base.id, "base_predicted_size": sizes[key]}

    async def _spec(self, name: str) -> tuple[ModelSpec | None, dict[str, int]]:
        hit = self._by_id.get(name)
        if hit is not None:
            self._by_id.move_to_end(name)
            return hit
        base = await self.state.resolve_model(name)
        if base is None or base.id != name:
            return base, {}
        self._by_id[name] = (base, {})
        while len(self._by_id) > self.keep:
            self._by_id.popitem(last=False)
        return self._by_id[name]
