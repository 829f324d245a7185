"""The disk cache's temporaries: a pull's half-written files, left behind by a loader killed
mid-download, are removed when the next loader starts (their lock died with their process),
while a live pull's temporary is left alone.

Kind: unit with real processes (a child python that holds a temporary, killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshserve_loader.diskcache import DiskCache

HOLDER = """
import sys, time
from pathlib import Path
from meshserve_loader.diskcache import DiskCache
d = DiskCache(Path(sys.argv[1]), 1 << 30).staging()
(d / "model.joblib").write_bytes(b"half of a model")
print(d, flush=True)
time.sleep(60)
"""


def _holder(root: Path) -> tuple[subprocess.Popen[str], Path]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line, "the holder did not start"
    return p, Path(line)


def test_a_killed_pulls_temporary_is_removed_a_live_one_kept(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    live, live_dir = _holder(root)
    dead, dead_dir = _holder(root)
    try:
        time.sleep(1.2)  # past the grace between a pull's mkdir and its lock
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(10)
        cache = DiskCache(root, 1 << 30)
        removed = cache.clean_staging()
        assert removed == [dead_dir] and not dead_dir.exists()
        assert (live_dir / "model.joblib").exists(), "a live pull's temporary is never removed"
        # Our own temporaries: kept while we fill them, released on commit.
        mine = cache.staging()
        (mine / "m.txt").write_text("x")
        time.sleep(1.2)
        assert mine.exists() and cache.clean_staging() == []
        path = cache.commit("src", mine, "m.txt")
        assert path.read_text() == "x" and not cache._held
    finally:
        live.kill()
        live.wait(10)
    time.sleep(1.2)
    assert DiskCache(root, 1 << 30).clean_staging() == [live_dir]
