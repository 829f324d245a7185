"""Issue 19 §2: identical files are booked at the same size. A real built-in runtime process
(`python -m meshserve_loader.builtin`, as the loader starts it, on 127.0.0.1) loads the same
344,817-byte digits SVM under ten ids while inference runs on another copy (inference has its
own thread pool, as in production: that is one of the things that made RSS deltas noisy). The
sizes it reports must agree within 10% and never be below the loader's prediction.

Before the fix the runtime reported its RSS delta: 36,864 to 675,840 bytes for these files.

Kind: integration (real runtime process, real model file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_testing import devmesh
from meshserve_loader.storage import predict_size

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "modelmesh-examples" / "bucket" / "sklearn" / "mnist-svm.joblib"
COPIES = 10
ROW = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] * 8  # any 64 pixel values


def _post(url: str, body: dict[str, object], timeout: float = 60.0) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[dict[str, int], list[Path]]]:
    if not FIXTURE.exists():
        pytest.skip(f"the digits SVM fixture is not at {FIXTURE}")
    data = tmp_path / "data"
    # Identical files at different paths, as ten InferenceServices of the same model would be pulled.
    files = []
    for i in range(COPIES + 1):
        f = data / "pvc" / "vol" / f"m{i}" / "model.joblib"
        f.parent.mkdir(parents=True)
        shutil.copyfile(FIXTURE, f)
        files.append(f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    # On ports it binds itself (0) and writes to the ports file, as the loader starts it.
    env.update({"MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_DATA_DIR": str(data)})
    log, ports_file = tmp_path / "runtime.log", tmp_path / "ports.json"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "meshserve_loader.builtin", "--ports-file", str(ports_file), "--index", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        devmesh.wait_until(lambda: ports_file.exists() or proc.poll() is not None, 60, "runtime listening")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield json.loads(ports_file.read_text()), files
    finally:
        devmesh.stop(proc)


@pytest.mark.timeout(180)
def test_identical_files_report_the_same_size_never_below_the_prediction(runtime: tuple[dict[str, int], list[Path]]) -> None:
    ports, files = runtime
    control = f"http://127.0.0.1:{ports['control']}"
    data = f"http://127.0.0.1:{ports['rest']}"
    predicted = predict_size(files[0], "sklearn")
    assert predicted == int(344_817 * 1.25) + 64 * 1024

    def load(i: int) -> int:
        code, body = _post(f"{control}/v2/repository/models/m{i}/load",
                           {"parameters": {"path": str(files[i]), "format": "sklearn", "predicted_size": predicted}})
        assert code == 200, body
        return int(body["size_bytes"])  # type: ignore[arg-type]

    load(0)  # the copy that serves traffic while the others load
    stop = threading.Event()
    served = [0]

    def infer() -> None:
        while not stop.is_set():
            code, body = _post(f"{data}/v2/models/m0/infer",
                               {"inputs": [{"name": "predict", "shape": [16, 64], "datatype": "FP32", "data": ROW * 16}]})
            assert code == 200, body
            served[0] += 1

    clients = [threading.Thread(target=infer, daemon=True) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        sizes = [load(i) for i in range(1, COPIES + 1)]
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert served[0] > 0, "inference ran while the copies loaded"
    spread = (max(sizes) - min(sizes)) / min(sizes)
    assert spread <= 0.10, f"sizes of identical files spread {spread:.0%}: {sizes}"
    assert min(sizes) >= predicted, f"a size below the prediction {predicted}: {sizes}"
    # The runtime's stats (what the loader re-registers with after a restart) say the same.
    code, body = devmesh.http_get(f"{data}/v2/meshserve/stats")
    stats = json.loads(body)
    assert [stats[f"m{i}"]["size"] for i in range(1, COPIES + 1)] == sizes
