"""What the object-store pullers (S3, GCS, Azure Blob) share once the objects are listed: the
size check before downloading, the single-file or directory layout, the path-escape check on
object names, the byte budget, the sha256 and progress. Each store only lists and reads."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Callable, Iterable

from meshserve_loader.sink import Budget, Progress, Sink
from meshserve_loader.storage import StorageError, safe_join


def write_objects(
    what: str,
    key: str,
    objects: list[tuple[str, int]],
    dest: Path,
    max_bytes: int,
    progress_min_bytes: int,
    sha256: str,
    on_progress: Callable[[int, int], None] | None,
    read: Callable[[str], Iterable[bytes]],
    name_of: Callable[[str], str],
) -> str:
    """Download `objects` ((name, size), as listed for `key`) into the empty dir `dest` with
    `read(name)` (an iterator of chunks); `name_of(name)` says where from, for errors.
    Returns the model's path relative to `dest` ("" when it is the whole directory)."""
    if not objects:
        raise StorageError(f"{what}: no such object or prefix")
    total = sum(size for _, size in objects)
    if total > max_bytes:
        raise StorageError(f"{what}: model is {total} bytes, over the limit of {max_bytes} (MESHSERVE_MAX_MODEL_BYTES)")
    single = len(objects) == 1 and objects[0][0] == key
    if sha256 and not single:
        raise StorageError(f"{what}: a sha256 digest can only be checked for a single-file model, this is a prefix")
    budget = Budget(max_bytes)
    progress = Progress(what, total, progress_min_bytes, on_progress)
    for obj_key, _ in objects:
        rel = posixpath.basename(obj_key) if single else obj_key[len(key) + 1 :] if key else obj_key
        target = safe_join(dest, rel)  # an object name with '..' must not write outside dest
        target.parent.mkdir(parents=True, exist_ok=True)
        sink = Sink(target, name_of(obj_key), budget, progress)
        try:
            for chunk in read(obj_key):
                sink.write(chunk)
        finally:
            sink.close()
        sink.verify(sha256 if single else "")
    return posixpath.basename(key) if single else ""
