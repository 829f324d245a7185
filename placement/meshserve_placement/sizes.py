"""The bytes placement books for a copy of a model. Pure, and the one place that decides it: the
leader (reload.py) and the simulator (bench/placement_sim.py) both call `booked_size`, so the
simulator books what the live service books.

What it is made of:
- `reported`: what a load of this model reported, the runtime's measurement never below the
  loader's prediction (disk size x 1.25, or the stated size). Identical files report the same
  size (issue 19 §2; docs/design/loader.md), so a model keeps it across evictions.
- `stated`: the size the InferenceService or Predictor states (`meshserve.io/memory`, or the
  predictor's `resources.requests.memory`; registry.py).
- `predicted`: for a model never loaded with no stated size, the prediction from its stored
  files made at registration (disk size x 1.25, ModelMesh's rule: `ModelSpec.predicted_size`,
  meshserve_loader/predict.py), the same the loader floors its report at.
- `UNKNOWN_MODEL_BYTES` when there is none of these: placement itself cannot see the files
  (they are in object stores it has no credentials for), and the registration's listing failed
  or was not made (cluster mode's controller lists S3 only, controller/meshserve_controller/storage_facts.py).
"""

from __future__ import annotations

from typing import Iterable

# What a never-loaded model with no stated size books: the median of the model sizes
# bench/placement_sim.py draws (lognormal around 64 MiB). A pod smaller than this takes such a
# model only once its size is stated (meshserve.io/memory) or known from an earlier load.
UNKNOWN_MODEL_BYTES = 64 << 20


def booked_size(stated: int, reported: int = 0, unknown: int = UNKNOWN_MODEL_BYTES, predicted: int = 0) -> int:
    """Bytes to book for one copy: the larger of the reported and the stated size, else the
    prediction from the stored files, else `unknown`. The loader already floors a report at the
    stated size (or the prediction); the max here makes a stated size raised since the last load
    count at once (the annotation is not part of the model's id, so the model and its remembered
    report stay)."""
    if reported > 0 or stated > 0:
        return max(reported, stated)
    return predicted if predicted > 0 else unknown


def reported_of(copy_sizes: Iterable[int]) -> int:
    """The reported size to remember for a model from the sizes of its LOADED copies (a leader
    that takes over sees only those): the largest, 0 when there are none."""
    return max((s for s in copy_sizes if s > 0), default=0)
