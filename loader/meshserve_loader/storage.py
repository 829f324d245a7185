"""Where a model's files come from. Resolves a ModelSpec's storage to a local path the runtime
can load, refusing any path that escapes its storage root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class StorageError(RuntimeError):
    pass


def safe_join(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths, `..` and symlinks that lead outside `root`."""
    if not rel or os.path.isabs(rel):
        raise StorageError(f"storage path {rel!r} must be relative to its storage root")
    if any(part == ".." for part in Path(rel).parts):
        raise StorageError(f"storage path {rel!r} must not contain '..'")
    root_real = root.resolve()
    target = (root / rel).resolve()
    if target != root_real and root_real not in target.parents:
        raise StorageError(f"storage path {rel!r} escapes its storage root (through a symlink)")
    return target


def predict_size(path: Path, fmt: str) -> int:
    """Bytes a model will take once loaded, guessed before load (ModelMesh's disk size x 1.25)."""
    if path.is_dir():
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    elif path.exists():
        disk = path.stat().st_size
    else:
        disk = 0
    return from_disk(disk)


def from_disk(disk: int) -> int:
    """ModelMesh's prediction from the files' bytes on disk (x 1.25), plus a small floor."""
    return int(disk * 1.25) + 64 * 1024


def within(path: Path, roots: "list[Path] | tuple[Path, ...]") -> Path:
    """`path` resolved (symlinks, `..`), if it lies in one of `roots`; else StorageError. The
    built-in runtime refuses loads outside its roots anyway: saying so here names the cause."""
    target = path.resolve()
    for root in roots:
        r = root.resolve()
        if target == r or r in target.parents:
            return target
    raise StorageError(f"local path {str(path)!r} is outside the PVC root and MESHSERVE_MODEL_ROOTS")


def resolve_local(storage: dict[str, Any], pvc_root: Path, model_roots: "list[Path] | tuple[Path, ...]" = ()) -> Path:
    """A pvc (`parameters.type: pvc` + `name`) or local storage entry -> an existing local path.
    A `file://` path must lie under `pvc_root` or one of `model_roots`."""
    params = storage.get("parameters") or {}
    rel = str(storage.get("path") or "")
    if params.get("type") == "pvc":
        name = str(params.get("name") or "")
        if not name or "/" in name or name in (".", ".."):
            raise StorageError(f"pvc storage needs a plain volume name, got {name!r}")
        target = safe_join(pvc_root / name, rel)
    elif str(storage.get("uri", "")).startswith(("file://", "pvc://")):
        uri = str(storage["uri"])
        if uri.startswith("pvc://"):
            name, _, rel = uri[len("pvc://") :].partition("/")
            target = safe_join(pvc_root / name, rel)
        else:
            raw = uri[len("file://") :]
            if not os.path.isabs(raw) or ".." in Path(raw).parts:
                raise StorageError(f"storageUri {uri!r}: a file:// path must be absolute, with no '..'")
            target = within(Path(raw), [pvc_root, *model_roots])
    else:
        raise StorageError(f"storage {storage!r} is not a local or pvc store")
    if not target.exists():
        raise StorageError(f"model file {target} does not exist")
    return target
