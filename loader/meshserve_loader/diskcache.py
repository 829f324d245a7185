"""The pod's disk cache of pulled models, with its own byte limit.

Each entry is a directory `<root>/<key digest>/` that appears whole (it is filled under a temporary
name, then renamed), so a crash never leaves a half-pulled model that looks complete. A marker
file inside says which path in the entry is the model and is touched on every use: its mtime is
the LRU clock. Evicting a model from memory keeps its entry, so a reload skips the download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("meshserve.loader.cache")

MARKER = ".meshserve-entry.json"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@dataclass
class DiskCache:
    root: Path
    max_bytes: int

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def entry_dir(self, source: str) -> Path:
        return self.root / hashlib.sha256(source.encode()).hexdigest()[:32]

    def lookup(self, source: str) -> Path | None:
        """The cached model path for `source`, marking it used; None when not cached."""
        d = self.entry_dir(source)
        marker = d / MARKER
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        os.utime(marker)
        return d / meta["path"] if meta.get("path") else d

    def staging(self) -> Path:
        """A fresh temporary directory inside the cache (same filesystem, so rename is atomic)."""
        d = self.root / f".tmp-{uuid.uuid4().hex}"
        d.mkdir()
        return d

    def commit(self, source: str, staged: Path, rel_path: str) -> Path:
        """Publish a filled staging dir as the entry for `source`; returns the model path."""
        (staged / MARKER).write_text(json.dumps({"source": source, "path": rel_path, "ts": time.time()}))
        d = self.entry_dir(source)
        try:
            os.rename(staged, d)
        except OSError:
            # Someone else (another pod sharing the cache, a concurrent pull) published first.
            shutil.rmtree(staged, ignore_errors=True)
            if self.lookup(source) is None:
                raise
        self.evict(keep=d)
        return d / rel_path if rel_path else d

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, dir) for each complete entry, oldest first."""
        out = []
        for d in self.root.iterdir():
            marker = d / MARKER
            if d.name.startswith(".tmp-") or not marker.exists():
                continue
            out.append((marker.stat().st_mtime, tree_bytes(d), d))
        return sorted(out)

    def used_bytes(self) -> int:
        return sum(b for _, b, _ in self.entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits its limit (never `keep`)."""
        entries = self.entries()
        total = sum(b for _, b, _ in entries)
        removed = []
        for _, size, d in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and d == keep:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= size
            removed.append(d)
            log.info("disk cache: evicted %s (%d bytes), now %d of %d bytes", d.name, size, total, self.max_bytes)
        return removed

    def clean_staging(self, older_than: float = 3600.0) -> None:
        """Remove temporaries a crashed pull left behind."""
        now = time.time()
        for d in self.root.glob(".tmp-*"):
            if now - d.stat().st_mtime > older_than:
                shutil.rmtree(d, ignore_errors=True)
