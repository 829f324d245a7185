"""Issue 19: an idle built-in runtime holds no model format's library (scikit-learn and scipy
alone were ~110 MiB of each runtime's RSS, most of `meshserve up`'s idle memory); the first
load of a format imports it, and MESHSERVE_RUNTIME_PREIMPORT imports the named ones at start.

Kind: integration (a real runtime process, `python -m meshserve_loader.builtin` on 127.0.0.1, as
the loader starts it; what it has imported is read from the shared objects it maps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from meshserve_testing import devmesh
from meshserve_loader.builtin.server import preimport_modules

SVM = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "modelmesh-examples" / "bucket" / "sklearn" / "mnist-svm.joblib"
LIBRARIES = ("sklearn", "scipy", "xgboost", "lightgbm", "onnxruntime")


def test_preimport_names_each_formats_libraries() -> None:
    assert preimport_modules(["sklearn", " ONNX"]) == ["joblib", "sklearn.svm", "sklearn.linear_model", "sklearn.ensemble", "onnxruntime"]
    assert preimport_modules(["string", "no-such-format"]) == []


def _mapped_libraries(pid: int) -> set[str]:
    """Which of LIBRARIES have a compiled module mapped into the process."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {lib for lib in LIBRARIES if f"/site-packages/{lib}/" in maps}


def _start(tmp: Path, **env: str) -> tuple["subprocess.Popen[bytes]", dict[str, int]]:
    ports = tmp / "ports.json"
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    full.update({"MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_DATA_DIR": str(tmp / "data"), **env})
    proc = subprocess.Popen([sys.executable, "-m", "meshserve_loader.builtin", "--ports-file", str(ports), "--index", "0"],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    devmesh.wait_until(lambda: ports.exists() or proc.poll() is not None, 60, "runtime listening")
    assert proc.poll() is None
    return proc, json.loads(ports.read_text())


@pytest.mark.timeout(180)
def test_an_idle_runtime_imports_a_format_only_when_a_model_needs_it(tmp_path: Path) -> None:
    if not SVM.exists():
        pytest.skip(f"the digits SVM fixture is not at {SVM}")
    model = tmp_path / "data" / "pvc" / "vol" / "model.joblib"
    model.parent.mkdir(parents=True)
    shutil.copyfile(SVM, model)
    proc, ports = _start(tmp_path)
    try:
        assert _mapped_libraries(proc.pid) == set()
        body = json.dumps({"parameters": {"path": str(model), "format": "sklearn"}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{ports['control']}/v2/repository/models/svm/load", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
        assert _mapped_libraries(proc.pid) == {"sklearn", "scipy"}  # the SVM's own, not the other formats'
    finally:
        devmesh.stop(proc)


@pytest.mark.timeout(180)
def test_preimport_loads_the_named_formats_at_start(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, MESHSERVE_RUNTIME_PREIMPORT="onnx")
    try:
        devmesh.wait_until(lambda: "onnxruntime" in _mapped_libraries(proc.pid), 120, "onnxruntime imported")
        assert "sklearn" not in _mapped_libraries(proc.pid)
    finally:
        devmesh.stop(proc)
