"""MLServer in its own venv (it pins protobuf 6, we use 7: they can't share one, brief §1).

`ensure_mlserver(root)` creates `<root>/.venv-mlserver` with mlserver and mlserver-sklearn at a
pinned version, once: a stamp file names what was installed, so later calls return at once and
a changed pin reinstalls. Used by the MLServer tests and by MLServer pods in `meshserve up`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

MLSERVER_VERSION = "1.7.1"
PACKAGES = (f"mlserver=={MLSERVER_VERSION}", f"mlserver-sklearn=={MLSERVER_VERSION}")
VENV_NAME = ".venv-mlserver"


class MLServerInstallError(RuntimeError):
    pass


def venv_dir(root: Path) -> Path:
    return Path(os.environ.get("MESHSERVE_MLSERVER_VENV") or root / VENV_NAME)


def mlserver_binary(root: Path) -> Path:
    return venv_dir(root) / "bin" / "mlserver"


def _python311() -> str:
    for name in ("python3.11", "python3"):
        exe = shutil.which(name)
        if exe:
            return exe
    return sys.executable


def ensure_mlserver(root: Path, timeout: float = 900.0) -> Path:
    """The mlserver executable, installing it first if needed (a few minutes, once)."""
    venv = venv_dir(root)
    stamp = venv / ".meshserve-installed"
    want = " ".join(PACKAGES)
    if stamp.exists() and stamp.read_text().strip() == want and mlserver_binary(root).exists():
        return mlserver_binary(root)
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run([_python311(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PACKAGES],
                       check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as e:
        raise MLServerInstallError(f"installing {want} into {venv} failed:\n{(e.stderr or '')[-3000:]}") from None
    except subprocess.TimeoutExpired:
        raise MLServerInstallError(f"installing {want} into {venv} took over {timeout:g}s") from None
    stamp.write_text(want)
    return mlserver_binary(root)
