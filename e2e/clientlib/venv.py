"""`ensure_clients(root)`: `<root>/.venv-clients` with tritonclient and the kserve SDK at pinned
versions, installed once (a stamp names what was installed). Used by e2e/test_clients.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = ("tritonclient[http,grpc]==2.73.0", "kserve==0.21.0")
VENV_NAME = ".venv-clients"


def ensure_clients(root: Path, timeout: float = 1200.0) -> Path:
    """The clients venv's python, installing it first if needed (a few minutes, once)."""
    venv = root / VENV_NAME
    py = venv / "bin" / "python"
    stamp = venv / ".meshserve-installed"
    want = " ".join(PACKAGES)
    if stamp.exists() and stamp.read_text().strip() == want and py.exists():
        return py
    exe = shutil.which("python3.11") or sys.executable
    if not py.exists():
        subprocess.run([exe, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"installing {want} into {venv} failed:\n{r.stderr[-3000:]}")
    stamp.write_text(want)
    return py
