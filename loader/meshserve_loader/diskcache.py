"""The pod's disk cache of pulled models, with its own byte limit.

Each entry is a directory `<root>/<key digest>/` that appears whole (it is filled under a temporary
name, then renamed), so a crash never leaves a half-pulled model that looks complete. A marker
file inside says which path in the entry is the model and is touched on every use: its mtime is
the LRU clock. Evicting a model from memory keeps its entry, so a reload skips the download.

An entry can be pinned (`pin`): the loader pins the files of a base while adapters over it are
loaded on the pod. The runtime holds the base in memory and reads its files no more, but every
further adapter's load names the base by its files' path, so evicting them would pull the whole
base again (gigabytes for an LLM) for the next 150 KB adapter. A pinned entry is never evicted;
the cache may then exceed its limit by the pinned bytes, and says so in its log.

A temporary is flock'ed by the process filling it. The kernel drops that lock when the process
dies, even by SIGKILL, so the half-pulled temporaries of a killed loader are told from live
pulls and removed when the loader starts again and before each pull, instead of taking disk
space for an hour (a loader OOM-killed while pulling an 8 GiB model, again and again, would
otherwise fill the disk).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
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
    _held: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # our temporaries' lock fds
    _pins: dict[Path, int] = field(default_factory=dict, init=False, repr=False)  # entry dir -> holders

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
        """A fresh temporary directory inside the cache (same filesystem, so rename is atomic),
        locked by this process until it is committed or removed."""
        self.clean_staging()
        d = self.root / f".tmp-{uuid.uuid4().hex}"
        d.mkdir()
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            return d  # no lock: only the age rule will clean it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return d
        self._held[d.name] = fd
        return d

    def _release(self, name: str) -> None:
        fd = self._held.pop(name, None)
        if fd is not None:
            os.close(fd)

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
        finally:
            self._release(staged.name)
        self.evict(keep=d)
        return d / rel_path if rel_path else d

    def _entry_of(self, path: Path | str) -> Path | None:
        """The entry dir holding `path`, or None for a path outside the cache (a PVC's model)."""
        try:
            rel = Path(path).relative_to(self.root)
        except ValueError:
            return None
        return self.root / rel.parts[0] if rel.parts else None

    def pin(self, path: Path | str) -> None:
        """Keep the entry holding `path` until as many `unpin`s; nothing for a path outside the cache."""
        d = self._entry_of(path)
        if d is not None:
            self._pins[d] = self._pins.get(d, 0) + 1

    def unpin(self, path: Path | str) -> None:
        d = self._entry_of(path)
        if d is None or d not in self._pins:
            return
        self._pins[d] -= 1
        if not self._pins[d]:
            del self._pins[d]

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
            if (keep is not None and d == keep) or d in self._pins:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= size
            removed.append(d)
            log.info("disk cache: evicted %s (%d bytes), now %d of %d bytes", d.name, size, total, self.max_bytes)
        if total > self.max_bytes and self._pins:
            log.warning("disk cache: %d bytes over its limit of %d, held by the files of %d base(s) in use by loaded adapters",
                        total - self.max_bytes, self.max_bytes, len(self._pins))
        return removed

    def clean_staging(self, older_than: float = 3600.0) -> list[Path]:
        """Remove temporaries a crashed or failed pull left behind: those no live process holds
        locked, and, where the lock can't be told (no flock), those older than `older_than`."""
        for name in [n for n in self._held if not (self.root / n).exists()]:
            self._release(name)  # our own pull failed and removed its temporary
        now = time.time()
        removed = []
        for d in self.root.glob(".tmp-*"):
            if d.name in self._held:
                continue
            try:
                age = now - d.stat().st_mtime
                lock = _lock_state(d)
                # (A second's grace covers a live pull between its mkdir and its flock.)
                stale = (lock == "free" and age > 1.0) or (lock == "unknown" and age > older_than)
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
                log.info("disk cache: removed %s, left behind by a pull that did not finish", d.name)
        return removed


def _lock_state(d: Path) -> str:
    """"locked" while a live process holds `d`'s lock, "free" when none does, "unknown" when the
    filesystem can't tell."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "locked"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)  # closing drops the lock we may have just taken
    return "free"
