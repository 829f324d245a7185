"""Adapters over a shared base in an MLServer pool (issue 17 item 3): the loader hands the
resolved base path to each adapter's model-settings.json (`parameters.extra.base_model_path` and
`base_model`), so a user's MLModel loads the base's files from where the loader fetched them,
once for all the adapters over it.

Two adapters name their base by the meshserve.io/base-model annotation; the base is an ordinary
InferenceService with its own storage. The user's classes are
meshserve_testing/mlserver_adapter.py, copied into the models' folders as users ship theirs.

Kind: e2e. Real Valkey, Envoy, placement, loader and MLServer 1.7.1 (from its own venv); the
v2 REST requests go through the gateway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from meshserve_loader.servers.mlserver_venv import ensure_mlserver
from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
PVC = "adapter-pvc"
BASE_ANNOTATION = "    meshserve.io/base-model: shared-base\n"
USER_CODE = Path(devmesh.__file__).parent / "mlserver_adapter.py"  # imports mlserver: copied, not imported


def _config(tmp: Path) -> Path:
    cfg = tmp / "mesh-config"
    cfg.mkdir()
    runtime = (REPO / "mesh-config" / "examples" / "runtimes" / "mlserver.yaml").read_text()
    # The users' own format for their MLModel classes, served by this runtime.
    runtime = runtime.replace("  supportedModelFormats:\n", "  supportedModelFormats:\n    - name: text-adapter\n      autoSelect: true\n")
    (cfg / "mlserver.yaml").write_text(runtime)
    docs = [devmesh.inference_service("shared-base", "text-adapter", devmesh.pvc_storage(PVC, "base"))]
    docs += [devmesh.inference_service(n, "text-adapter", devmesh.pvc_storage(PVC, n), BASE_ANNOTATION) for n in ("adapter-a", "adapter-b")]
    (cfg / "models.yaml").write_text("---\n".join(docs))
    return cfg


def _write(root: Path, name: str, implementation: str, files: dict[str, str]) -> None:
    d = root / name
    d.mkdir(parents=True)
    shutil.copy(USER_CODE, d / "mlserver_adapter.py")
    (d / "model-settings.json").write_text(json.dumps({"implementation": f"mlserver_adapter.{implementation}"}))
    for f, text in files.items():
        (d / f).write_text(text)


def _infer(m: devmesh.Mesh, model: str, text: str) -> str:
    body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{m.rest}/v2/models/{model}/infer", "-H", "Content-Type: application/json",
                          "-d", body, "-w", "\n%{http_code}", "--max-time", "150"], capture_output=True, text=True, timeout=180)
    doc, _, code = out.stdout.rpartition("\n")
    assert code == "200", f"{model}: {out.stdout}{out.stderr}\n{m.log()[-4000:]}"
    (answer,) = json.loads(doc)["outputs"][0]["data"]
    return answer


def test_adapters_over_a_base_share_its_files_on_mlserver(tmp_path: Path) -> None:
    ensure_mlserver(REPO)
    with devmesh.mesh(config_dir=_config(tmp_path), pods=1, pod_runtimes="mlserver-1.x", timeout=300) as m:
        root = m.data_dir / "pvc" / PVC
        _write(root, "base", "Base", {"vocab.txt": "alpha beta gamma delta"})
        _write(root, "adapter-a", "Adapter", {"suffix.txt": "A"})
        _write(root, "adapter-b", "Adapter", {"suffix.txt": "B"})

        # Cold: placement brings the base onto the pod, then the adapter; the adapter's MLModel
        # read the base's four words from the path the loader gave it.
        a = _infer(m, "adapter-a", "hi")
        base_id, words, bases_read, rest = a.split("|")
        assert base_id.startswith("shared-base__isvc-") and words == "4" and bases_read == "1" and rest == "A:hi", a
        # The second adapter over it: the same base, not read again in MLServer's process.
        assert _infer(m, "adapter-b", "yo") == f"{base_id}|4|1|B:yo"
        # Warm, and the base answers as itself.
        assert _infer(m, "adapter-a", "again") == f"{base_id}|4|1|A:again"
        assert _infer(m, "shared-base", "x") == "base|4:x"
        settings = json.loads(next((m.data_dir).rglob("adapter-b__isvc-*/model-settings.json")).read_text())
        extra = settings["parameters"]["extra"]
        assert extra["base_model"] == base_id and (Path(extra["base_model_path"]) / "vocab.txt").read_text() == "alpha beta gamma delta"
