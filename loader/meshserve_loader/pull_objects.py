"""What the object-store pullers (S3, GCS, Azure Blob) share once the objects are listed: the
size check before downloading, the single-file or directory layout, the path-escape check on
object names, the byte budget, the sha256 and progress. Each store only lists and reads, or (S3)
downloads a whole object into a file itself, with concurrent ranged GETs, reporting bytes as
they arrive."""

from __future__ import annotations

import posixpath
import threading
from pathlib import Path
from typing import Callable, Iterable

from meshserve_loader.sink import Budget, Progress, Sink, check_digest
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
    read: Callable[[str], Iterable[bytes]] | None,
    name_of: Callable[[str], str],
    download: Callable[[str, Path, Callable[[int], None]], str] | None = None,
) -> str:
    """Download `objects` ((name, size), as listed for `key`) into the empty dir `dest` with
    `read(name)` (an iterator of chunks), or else `download(name, target, count)`, which fills
    the file `target`, calls `count(n)` for every n bytes received (negative when a retried
    range takes back what it had counted; from any thread, and it raises to stop the download
    when the size limit is passed) and returns the file's sha256 (hex; "" when `sha256` is "":
    it need not hash then); `name_of(name)` says where from, for errors.
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
        if download is not None:
            got = _download(download, obj_key, target, name_of(obj_key), budget, progress)
            check_digest(name_of(obj_key), got, sha256 if single else "")
            continue
        assert read is not None
        sink = Sink(target, name_of(obj_key), budget, progress)
        try:
            for chunk in read(obj_key):
                sink.write(chunk)
        finally:
            sink.close()
        sink.verify(sha256 if single else "")
    return posixpath.basename(key) if single else ""


def _download(download: Callable[[str, Path, Callable[[int], None]], str], obj_key: str, target: Path, what: str,
              budget: Budget, progress: Progress) -> str:
    """One object through `download`, charging the shared budget and progress as bytes arrive.
    The ranges arrive on several threads at once: one lock keeps the counts whole. The limit is
    checked on bytes received, not on the listed size alone, so an object that grew after it
    was listed is still stopped mid-pull."""
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            budget.charge(n, what)
            progress.add(n)

    return download(obj_key, target, count)
