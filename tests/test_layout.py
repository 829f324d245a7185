"""Kind: unit (subprocess). The repository layout never shadows xds-protos' packages, and the
committed generated protobuf code is what the pinned generator produces."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_python_m_from_root_imports_project_and_envoy() -> None:
    code = (
        "import envoy.config.route.v3.route_pb2, xds.type.matcher.v3.matcher_pb2, udpa, validate\n"
        "import meshserve, meshserve_xds.resources, meshserve_placement.policy, meshserve_loader.agent, meshserve_proto\n"
        "import meshserve_rollout.controller, meshserve_controller.watch\n"
        "print('ok')"
    )
    (Path(tempfile.gettempdir()) / "ms_layout_probe.py").write_text(code)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # `python -m` puts the repository root first on sys.path: the case the brief warns about.
    out = subprocess.run([sys.executable, "-m", "meshserve_xds.resources"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_component_folders_are_not_packages() -> None:
    for folder in ("xds", "placement", "loader", "rollout", "controller", "proto"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow or confuse imports"


def test_generated_proto_code_is_current(tmp_path: Path) -> None:
    # The pinned generator runs in a uv environment of its own, as `make proto` runs it: the
    # version sets which grpcio/protobuf the committed code accepts (pyproject.toml).
    generator = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["meshserve"]["proto-generator"]
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is missing: install the test extra (pip install -e '.[all,test]')"
    protos = sorted((REPO / "proto" / "meshserve_proto").glob("*.proto"))
    assert protos
    for proto in protos:
        rel = proto.relative_to(REPO / "proto")
        out = subprocess.run(
            [uv, "run", "--no-project", "--isolated", "-q", "-p", sys.executable, "--with", generator,
             "python", "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"), f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(rel)],
            cwd=REPO / "proto", capture_output=True, text=True, timeout=240,
        )
        assert out.returncode == 0, out.stderr
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            gen = tmp_path / rel.parent / (proto.stem + suffix)
            committed = REPO / "proto" / rel.parent / (proto.stem + suffix)
            assert committed.read_text() == gen.read_text(), f"{committed} is stale: run `make proto`"
