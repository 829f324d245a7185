"""Third-party Python packages that can't share our venv (they pin another protobuf, or another
redis-py), each in a venv of its own under the repository, installed once: a stamp file names
what was installed, so later calls return at once and a changed pin reinstalls. Test-only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def ensure(root: Path, name: str, packages: tuple[str, ...], timeout: float = 1200.0) -> Path:
    """`<root>/<name>`'s python, with `packages` installed (a few minutes the first time)."""
    venv = root / name
    py = venv / "bin" / "python"
    stamp = venv / ".meshserve-installed"
    want = " ".join(packages)
    if stamp.exists() and stamp.read_text().strip() == want and py.exists():
        return py
    exe = shutil.which("python3.11") or sys.executable
    if not py.exists():
        subprocess.run([exe, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"installing {want} into {venv} failed:\n{r.stderr[-3000:]}")
    stamp.write_text(want)
    return py
