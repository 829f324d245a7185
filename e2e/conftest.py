"""End-to-end fixtures: real Valkey, real Envoy, real runtimes, started by `meshserve up`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_testing import devmesh

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    return FIXTURES


@pytest.fixture(scope="session")
def e2e_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mesh-config/ plus a model whose file is corrupt, to see a load failure end to end."""
    d = tmp_path_factory.mktemp("mesh-config")
    for f in (REPO / "mesh-config").glob("*.yaml"):
        shutil.copy(f, d / f.name)
    (d / "broken.yaml").write_text(devmesh.inference_service("broken-model", "sklearn", devmesh.pvc_storage("my-models-pvc", "corrupt.joblib")))
    # A second copy of the example under another name: a model to load during fault tests.
    (d / "sklearn-mnist-b.yaml").write_text((REPO / "mesh-config" / "sklearn-mnist.yaml").read_text().replace("name: sklearn-mnist", "name: sklearn-mnist-b"))
    return d


@pytest.fixture(scope="session")
def mesh(e2e_config: Path) -> Iterator[devmesh.Mesh]:
    with devmesh.mesh(config_dir=e2e_config) as m:
        corrupt = m.data_dir / "pvc" / "my-models-pvc" / "corrupt.joblib"
        corrupt.write_bytes(b"this is not a joblib file")
        yield m
