"""A loaded model's own memory, counted from its objects rather than read off the process RSS.

Why not the RSS delta: identical 344 KB sklearn files measured anything from 36,864 to
675,840 bytes (issue 19). The delta sees whatever else the process did meanwhile (inference on
the worker threads, allocator arenas growing or reusing freed pages, lazy imports), so the same
file cost a different amount each time and a pod held an unpredictable number of models.

The footprint here is deterministic for identical files: it walks the objects reachable from the
model (bounded), sums `sys.getsizeof` of each distinct object, and counts each numpy buffer once
(a view's bytes are its base's). Shared library code (modules, classes, functions) is not the
model's and is not walked. What it cannot see is memory a native library allocates behind a
handle (xgboost, lightgbm, onnxruntime sessions, torch tensors in a user class): see
`NATIVE_FORMATS` and docs/design/loader.md.
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any

import numpy as np

# Formats whose models live in native memory behind a small Python handle: the walk sees only
# the handle, so the runtime reports the prediction (file size x 1.25) for them.
NATIVE_FORMATS = frozenset({"xgboost", "lightgbm", "onnx"})

# A bound on the walk, so a model that references a huge graph (or the world, through a global)
# costs the load a bounded time: 1,000,000 small objects took 3 s on a busy 2-core box. Past it
# the count is partial, and the prediction (the floor) stands for the rest.
MAX_OBJECTS = 1_000_000

# Shared by every model in the process; a reference to one says nothing of the model's size.
_SHARED = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.CodeType, types.FrameType)


def footprint(root: Any, max_objects: int = MAX_OBJECTS, skip: "tuple[Any, ...]" = ()) -> int:
    """Bytes of the objects reachable from `root`, each counted once; numpy data buffers once
    per owner. Stops (returning what it has counted) after `max_objects` objects. Objects in
    `skip` (and what only they reach) are not counted: an adapter's base, say, which is
    shared and sized on its own."""
    seen: set[int] = {id(o) for o in skip}
    total = 0
    stack: list[Any] = [root]
    while stack and len(seen) < max_objects:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SHARED):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            # getsizeof counts the data only for an array that owns it; a view's data is its
            # base's, counted when the base is reached (here, through `.base`).
            total += sys.getsizeof(obj)
            if obj.base is not None:
                stack.append(obj.base)
            if obj.dtype.hasobject:
                stack.extend(obj.ravel().tolist())
            continue
        try:
            total += sys.getsizeof(obj)
        except TypeError:  # some extension types refuse __sizeof__
            pass
        # gc.get_referents covers containers and instances (their __dict__ or slots); for
        # objects outside the gc (str, bytes, numbers) it is empty, which is right: they hold
        # no references.
        stack.extend(gc.get_referents(obj))
    return total
