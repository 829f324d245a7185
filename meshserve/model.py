"""Plain data shared by every component: what a model is, what a pod is, where copies are.

These types are the vocabulary of the pure policy code and the Redis schema alike, so they
serialise to and from JSON with no other logic.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class CopyState:
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    UNLOADING = "unloading"


@dataclass
class ModelSpec:
    id: str  # concrete model id, `<alias>__isvc-<10 hex>`
    alias: str  # InferenceService name: the virtual model users address
    format: str
    storage: dict[str, Any]
    namespace: str = "default"
    format_version: str = ""
    runtime: str = ""
    min_copies: int = 0
    max_copies: int = 0  # 0 = no limit
    pinned: bool = False
    size_hint: int = 0  # bytes, 0 = predict from the file
    # Bytes predicted from the stored files at registration (disk x 1.25, listed by `meshserve
    # apply`/`up`: meshserve_loader/predict.py); placement books it before the first load
    # (sizes.py). 0: not listed (no storage access, a listing failed): the unknown-size default.
    predicted_size: int = 0
    # The model this one adapts (issue 17): the name (alias) of another registered model, whose
    # files the loader fetches too and whose weights the runtime shares between its adapters.
    # From the `meshserve.io/base-model` annotation, or PEFT's adapter_config.json
    # (`base_model_name_or_path`) in the model's own files. "" = an ordinary model.
    base: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "ModelSpec":
        return cls(**_known(cls, json.loads(raw)))


@dataclass
class Pod:
    id: str
    host: str
    rest_port: int
    grpc_port: int
    capacity_bytes: int
    formats: list[str] = field(default_factory=list)  # model formats its runtime declares
    runtime: str = "builtin"  # its ServingRuntime's name
    # The formats its runtime auto-selects (KServe `autoSelect`); None, as pods registered by
    # older versions say: all of `formats`.
    auto_formats: list[str] | None = None
    max_loading: int = 2
    draining: bool = False  # preStop: placement should move its models and place nothing new
    # Its runtime finds a model by any of its names (the built-in: an alias is resolved by the
    # runtime, loader/meshserve_loader/builtin/table.py), so the gateway need not rewrite the
    # name to the id: its models can share one RouteConfiguration per pod set
    # (docs/design/routing.md "Shared routes"). False, as pods registered by older versions say.
    resolves_names: bool = False
    # Its runtime holds a request sent with `ms-await-load` until the load of its model ends
    # (headers.AWAIT_LOAD_HEADER: the built-in), so the activator may send a cold request
    # ahead of the load. False, as pods registered by older versions say.
    awaits_loads: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Pod":
        return cls(**_known(cls, json.loads(raw)))


def auto_selected(fmt: str, auto_formats: dict[str, Any]) -> str | None:
    """KServe's rule for a model that names no runtime: of the runtimes (name -> the formats it
    auto-selects), the first by name that auto-selects `fmt`. The controller, placement and the
    loader (with versions, serving_runtime.py `select_runtime`) all pick this way."""
    for name in sorted(auto_formats):
        if fmt in auto_formats[name]:
            return name
    return None


def alias_of_id(model_id: str) -> str | None:
    """The alias a concrete id was made for: ModelMesh's naming (`<alias>__isvc-<hash>`,
    `<alias>__ksp-<hash>`; registry.py `concrete_model_id`; aliases never hold '__'). None for
    an id not named that way. The loader tells the runtime a model's alias only when this agrees
    with it, and xDS reads no specs: both sides then know a loaded model's alias the same way."""
    alias, sep, _ = model_id.partition("__")
    return alias if sep and alias else None


@dataclass
class Copy:
    state: str
    size: int = 0
    since: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"state": self.state, "size": self.size, "since": self.since}
        if self.reason:
            d["reason"] = self.reason
        return d


def copies_from_json(raw: str | bytes | None) -> dict[str, Copy]:
    if not raw:
        return {}
    return {pod: Copy(**_known(Copy, c)) for pod, c in json.loads(raw).items()}


def copies_to_json(copies: dict[str, Copy]) -> str:
    return json.dumps({p: c.to_dict() for p, c in sorted(copies.items())}, separators=(",", ":"))


_FIELDS: dict[type, frozenset[str]] = {}


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    # Tolerate fields written by a newer version so a rolling upgrade never breaks reads.
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    if d.keys() <= names:
        return d
    return {k: v for k, v in d.items() if k in names}
