"""Writing a download: counts bytes against the size limit, hashes, and reports progress of
large pulls. Shared by the S3 and HTTP pullers so both enforce the same rules."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from meshserve_loader.storage import StorageError

log = logging.getLogger("meshserve.loader.pull")


class SizeLimitError(StorageError):
    pass


class DigestError(StorageError):
    pass


@dataclass
class Budget:
    """Bytes a model may take on disk, shared across all files of one pull."""

    max_bytes: int
    used: int = 0

    def charge(self, n: int, what: str) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise SizeLimitError(
                f"{what}: model is larger than the limit of {self.max_bytes} bytes "
                "(raise MESHSERVE_MAX_MODEL_BYTES if it is meant to be this big)"
            )


@dataclass
class Progress:
    """Logs every 10% of a pull whose size is known and at least `min_bytes`, and calls
    `on_progress(done, total)` (when given) after every chunk, whatever the size: it must be
    cheap and thread-safe (S3 pulls run in a worker thread); the agent's one only stores them."""

    what: str
    total: int
    min_bytes: int
    on_progress: Callable[[int, int], None] | None = None
    done: int = 0
    _next: int = field(default=1, init=False)

    def add(self, n: int) -> None:
        self.done += n
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)
        if self.total < self.min_bytes or self.total <= 0:
            return
        pct = self.done * 10 // self.total
        if pct >= self._next:
            self._next = pct + 1
            log.info("pulling %s: %d%% (%d of %d bytes)", self.what, min(100, pct * 10), self.done, self.total)


class Sink:
    def __init__(self, path: Path, what: str, budget: Budget, progress: Progress):
        self.path, self.what, self.budget, self.progress = path, what, budget, progress
        self.sha = hashlib.sha256()
        self.fh: BinaryIO = path.open("wb")

    def write(self, chunk: bytes) -> None:
        self.budget.charge(len(chunk), self.what)
        self.sha.update(chunk)
        self.fh.write(chunk)
        self.progress.add(len(chunk))

    def close(self) -> None:
        self.fh.close()

    def verify(self, sha256: str) -> None:
        """Raise DigestError unless the bytes written hash to `sha256` (hex, optional "sha256:")."""
        check_digest(self.what, self.sha.hexdigest(), sha256)


def check_digest(what: str, got: str, sha256: str) -> None:
    """Raise DigestError unless `got` (hex) is `sha256` (hex, optional "sha256:"; "" checks nothing)."""
    want = sha256.lower().removeprefix("sha256:")
    if want and got != want:
        raise DigestError(f"{what}: sha256 is {got}, expected {want}; the file is corrupt or the digest is wrong")
