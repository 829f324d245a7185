"""Issue 18 §4: `meshserve apply` refuses storage paths that escape their store root, with
`file:line: field: reason`, instead of accepting them and letting the load fail (which excludes
the pod from the model for failed_pod_exclusion_seconds).

Kind: unit (pure parsing), and one integration run of the CLI against a real Valkey.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshserve_testing import devmesh
from meshserve.apply import read_models
from meshserve.yamlfile import ConfigError


def _isvc(tmp_path: Path, storage: str, name: str = "m") -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(devmesh.inference_service(name, "sklearn", storage))
    return f


# (storage lines, the field named, the line it is on in devmesh.inference_service's layout)
ESCAPES = [
    (devmesh.pvc_storage("vol", "../../etc/passwd"), "spec.predictor.model.storage.path", 14),
    (devmesh.pvc_storage("vol", "a/../../b.joblib"), "spec.predictor.model.storage.path", 14),
    (devmesh.pvc_storage("vol", "/etc/meshserve/storage-config"), "spec.predictor.model.storage.path", 14),
    ("      storage:\n        key: localMinIO\n        path: ../other-tenant/model.joblib", "spec.predictor.model.storage.path", 14),
    (devmesh.uri_storage("pvc://vol/../other/m.joblib"), "spec.predictor.model.storageUri", 12),
    (devmesh.uri_storage("s3://bucket/models/../../secrets/x"), "spec.predictor.model.storageUri", 12),
    (devmesh.uri_storage("file:///data/pvc/vol/../../../etc/passwd"), "spec.predictor.model.storageUri", 12),
    (devmesh.uri_storage("file://relative/m.joblib"), "spec.predictor.model.storageUri", 12),
]


@pytest.mark.parametrize("storage,field,line", ESCAPES)
def test_escaping_storage_paths_are_refused_with_file_line_field(tmp_path: Path, storage: str, field: str, line: int) -> None:
    f = _isvc(tmp_path, storage)
    with pytest.raises(ConfigError) as e:
        read_models(f)
    assert (e.value.file, e.value.line, e.value.field) == (str(f), line, field), str(e.value)
    assert str(e.value).startswith(f"{f}:{line}: {field}: ") and ("escapes" in str(e.value) or "'..'" in str(e.value))


@pytest.mark.parametrize("storage", [
    devmesh.pvc_storage("vol", "mnist-svm.joblib"),
    devmesh.pvc_storage("vol", "models/v2/model..joblib"),  # '..' inside a name is no escape
    devmesh.uri_storage("pvc://vol/models/m.joblib"),
    devmesh.uri_storage("s3://bucket/models/m"),
    devmesh.uri_storage("file:///data/models/m.joblib"),
    devmesh.uri_storage("https://example.invalid/m.onnx?sig=x/../y"),  # a URL's query is the server's business
])
def test_paths_inside_their_store_still_apply(tmp_path: Path, storage: str) -> None:
    (spec,) = read_models(_isvc(tmp_path, storage))
    assert spec.alias == "m"


def test_cli_apply_refuses_an_escaping_path_and_writes_nothing(tmp_path: Path) -> None:
    """Kind: integration (real Valkey, no mesh)."""
    from meshserve import state as st
    from meshserve.cli import cli

    f = _isvc(tmp_path, devmesh.pvc_storage("my-models-pvc", "../../storage-config"), name="escape")
    with devmesh.valkey() as v:
        res = CliRunner().invoke(cli, ["apply", "-f", str(f)], env={"MESHSERVE_REDIS_URL": v.url})
        assert res.exit_code == 1, res.output
        assert f"{f}:14: spec.predictor.model.storage.path: '../../storage-config' escapes the store root" in res.output

        async def models() -> int:
            s = st.State.from_url(v.url)
            try:
                return int(await s.r.hlen(st.MODELS))
            finally:
                await s.close()

        assert asyncio.run(models()) == 0
