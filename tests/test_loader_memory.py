"""Kind: unit. Pod capacity from configuration or the cgroup limit minus memBufferBytes, the
cgroup file forms, process-tree RSS, and MLServer's model-settings.json layout: pure functions
and files in tmp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshserve_loader.memory import cgroup_limit_bytes, pod_capacity, tree_rss_bytes
from meshserve_loader.servers.mlserver import LayoutError, lay_out, model_settings
from meshserve_loader.storage import predict_size

GiB = 1 << 30


def test_capacity_rules() -> None:
    assert pod_capacity(0, 5 * GiB, 128 << 20) == 5 * GiB - (128 << 20)  # the users' runtime: 5Gi limit, 128Mi buffer
    assert pod_capacity(GiB, 5 * GiB, 128 << 20) == GiB  # configured wins when it fits
    assert pod_capacity(8 * GiB, 2 * GiB, 0) == 2 * GiB  # ... but never exceeds the container
    assert pod_capacity(GiB, 0, 128 << 20) == GiB  # no cgroup limit
    assert pod_capacity(0, 5 * GiB, GiB, runtime_baseline=GiB) == 3 * GiB
    with pytest.raises(ValueError, match="MESHSERVE_POD_CAPACITY_BYTES"):
        pod_capacity(0, 0, 0)


def test_cgroup_files(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")
    assert cgroup_limit_bytes((v2, v1)) == 0
    v2.write_text("5368709120\n")
    assert cgroup_limit_bytes((v2, v1)) == 5 * GiB
    v1.write_text("9223372036854771712\n")  # cgroup v1's "unlimited"
    assert cgroup_limit_bytes((tmp_path / "absent", v1)) == 0
    assert cgroup_limit_bytes((tmp_path / "absent",)) == 0


def test_tree_rss() -> None:
    assert tree_rss_bytes(os.getpid()) > 10 << 20
    assert tree_rss_bytes(2**22 + 12345) == 0  # no such process


def test_predicted_size_is_disk_times_1_25(tmp_path: Path) -> None:
    f = tmp_path / "m.bin"
    f.write_bytes(b"x" * 1_000_000)
    assert predict_size(f, "sklearn") == 1_250_000 + 64 * 1024


def test_mlserver_layout(tmp_path: Path) -> None:
    f = tmp_path / "m.joblib"
    f.write_bytes(b"x")
    s = model_settings("iris__isvc-1", "sklearn", f)
    assert s == {"name": "iris__isvc-1", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": str(f.resolve())}}
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "model.py").write_text("class M: ...")
    (custom / "model-settings.json").write_text(json.dumps({"name": "x", "implementation": "model.M", "parameters": {"extra": {"a": 1}}}))
    d = lay_out(tmp_path / "models", "peft__isvc-2", "peft-model", custom)
    written = json.loads((d / "model-settings.json").read_text())
    assert written["name"] == "peft__isvc-2" and written["implementation"] == "model.M" and written["parameters"]["extra"] == {"a": 1}
    assert (d / "model.py").is_symlink(), "the class's module sits beside model-settings.json"
    with pytest.raises(LayoutError, match="no built-in implementation for format 'pytorch'"):
        model_settings("t", "pytorch", f)
