"""The leader's model specs, kept as the JSON Redis holds and parsed when one is asked for.

A leader holds every registered model's spec (load orders carry it, minCopies and pinning come
from it), but at a million models parsing them all into `ModelSpec`s took most of its reload
(~8 us each) and 1.2 KiB a model, for specs it mostly never reads: only models that get a copy
are looked at again. `Specs` keeps the bytes of `HGETALL ms:models` as they came (no copy)
and parses one on access; a spec the leader applied since (a registration it followed) is kept
as the object it already has. What the view needs of every model (format, sizes, copies bounds,
pinning, runtime, base) is read by `view_fields`, with msgspec when installed: it decodes only
those fields, ~0.4 us a spec.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, MutableMapping, NamedTuple

from meshserve.model import ModelSpec

try:  # the `placement` extra: a decoder 20x faster than json's for the few fields the view needs
    import msgspec
except ImportError:  # pragma: no cover - the plain install parses with json (same result)
    msgspec = None  # type: ignore[assignment]


class Fields(NamedTuple):
    """The fields of a spec the leader's view is built from (reload.py `_model_view`)."""

    format: str
    size_hint: int
    predicted_size: int
    pinned: bool
    min_copies: int
    max_copies: int
    runtime: str
    base: str


if msgspec is not None:
    class _Fields(msgspec.Struct, gc=False):
        # Defaults as ModelSpec's: a spec written by an older version may lack a field.
        format: str = ""
        size_hint: int = 0
        predicted_size: int = 0
        pinned: bool = False
        min_copies: int = 0
        max_copies: int = 0
        runtime: str = ""
        base: str = ""

    _decode = msgspec.json.Decoder(_Fields).decode


def view_fields(raw: bytes | ModelSpec) -> Fields:
    """The view's fields of a spec, from its JSON (or the spec itself). Strings repeated across
    models (format, runtime) are interned: a million models share a few."""
    if isinstance(raw, ModelSpec):
        s: Any = raw
    elif msgspec is not None:
        try:
            s = _decode(raw)
        except msgspec.MsgspecError:
            s = ModelSpec.from_json(raw)  # a field of an unexpected type (or bad JSON): as the kernel reads it
    else:
        s = ModelSpec.from_json(raw)
    return Fields(sys.intern(s.format), s.size_hint, s.predicted_size, s.pinned, s.min_copies, s.max_copies,
                  sys.intern(s.runtime) if s.runtime else "", s.base)


class Specs(MutableMapping[str, ModelSpec]):
    """Model id -> spec, over `HGETALL ms:models` as it came (id bytes -> JSON bytes). A read
    parses the spec (a fresh object each time: callers never change specs in place); a write
    keeps the given spec as it is."""

    __slots__ = ("_d",)

    def __init__(self, raw: dict[bytes, Any] | None = None):
        self._d: dict[bytes, Any] = raw if raw is not None else {}

    def raw_items(self) -> Iterator[tuple[bytes, Any]]:
        """(id bytes, JSON bytes or ModelSpec) for every model, nothing parsed."""
        return iter(self._d.items())

    def __getitem__(self, model: str) -> ModelSpec:
        v = self._d[model.encode()]
        return v if isinstance(v, ModelSpec) else ModelSpec.from_json(v)

    def __setitem__(self, model: str, spec: ModelSpec) -> None:
        self._d[model.encode()] = spec

    def __delitem__(self, model: str) -> None:
        del self._d[model.encode()]

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and model.encode() in self._d

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self._d)

    def __len__(self) -> int:
        return len(self._d)
