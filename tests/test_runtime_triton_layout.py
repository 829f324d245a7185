"""Kind: unit (pure, files in tmp). What the loader writes into Triton's model repository per
modelFormat (servers/triton_layout.py): file names, config.pbtxt content, native Triton folders,
refusals. The client and the pods are tests/test_runtime_triton.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from meshserve_loader.servers.triton_layout import LayoutError, default_config, lay_out, strip_top_level_name


def _file(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _tree(d: Path) -> dict[str, str]:
    """path -> 'link:<target name>' | 'dir' | 'file' for everything under d (links not followed)."""
    out = {}
    for root, dirs, files in os.walk(d):  # os.walk doesn't descend into linked folders
        for name in dirs + files:
            p = Path(root) / name
            out[str(p.relative_to(d))] = f"link:{p.resolve().name}" if p.is_symlink() else ("dir" if p.is_dir() else "file")
    return out


def test_onnx_file(tmp_path: Path) -> None:
    src = _file(tmp_path / "pulled" / "digits.onnx")
    d = lay_out(tmp_path / "repo", "mnist__isvc-1", "onnx", src)
    assert d == tmp_path / "repo" / "mnist__isvc-1"
    assert _tree(d) == {"1": "dir", "1/model.onnx": "link:digits.onnx", "config.pbtxt": "file"}
    cfg = (d / "config.pbtxt").read_text()
    # platform/backend and max_batch_size 0 (onnxruntime auto-completes inputs and outputs only
    # when none of max_batch_size, inputs, outputs is given).
    assert [ln for ln in cfg.splitlines() if not ln.startswith("#")] == ['backend: "onnxruntime"', "max_batch_size: 0"]
    assert (d / "1" / "model.onnx").resolve() == src.resolve()
    assert not list((tmp_path / "repo").glob(".*"))  # no temp folder left


@pytest.mark.parametrize(
    "fmt,files,expect,config",
    [
        # A pulled folder holding one file; the file's own name doesn't matter.
        ("onnx", {"m/anything.onnx": b"o"}, {"1/model.onnx": "link:anything.onnx"}, "onnxruntime"),
        # ONNX with external weights: they sit beside model.onnx, which names them relatively.
        ("onnx", {"m/net.onnx": b"o", "m/net.weights": b"w"}, {"1/model.onnx": "link:net.onnx", "1/net.weights": "link:net.weights"}, "onnxruntime"),
        # TensorFlow SavedModel folder -> model.savedmodel/, auto-completed (no config written).
        ("tensorflow", {"m/saved_model.pb": b"s", "m/variables/variables.index": b"i"}, {"1/model.savedmodel": "link:m"}, None),
        ("tensorrt", {"m/resnet.plan": b"p"}, {"1/model.plan": "link:resnet.plan"}, None),
        ("TensorRT:8", {"m/resnet.engine": b"p"}, {"1/model.plan": "link:resnet.engine"}, None),  # ModelMesh: case and ':version' ignored
        ("python", {"m/model.py": b"class TritonPythonModel: ...", "m/util.py": b""}, {"1/model.py": "link:model.py", "1/util.py": "link:util.py"}, "python"),
        ("python", {"m/add.py": b"class TritonPythonModel: ..."}, {"1/model.py": "link:add.py"}, "python"),
        # Version folders in a plain (config-less) folder: the newest one, keeping its number.
        ("onnx", {"m/1/model.onnx": b"1", "m/3/model.onnx": b"3"}, {"3/model.onnx": "link:model.onnx"}, "onnxruntime"),
    ],
)
def test_formats(tmp_path: Path, fmt: str, files: dict[str, bytes], expect: dict[str, str], config: str | None) -> None:
    for rel, data in files.items():
        _file(tmp_path / rel, data)
    src = tmp_path / "m"
    if len(files) == 1 and fmt != "tensorflow":
        src = tmp_path / next(iter(files))  # also a single file, as pulled from S3 or a PVC
        lay_out(tmp_path / "repo-file", "id", fmt, src)
        src = src.parent
    d = lay_out(tmp_path / "repo", "id", fmt, src)
    tree = _tree(d)
    for rel, what in expect.items():
        assert tree.get(rel) == what, tree
    if config is None:
        assert "config.pbtxt" not in tree and default_config(fmt) == ""
    else:
        cfg = (d / "config.pbtxt").read_text()
        assert cfg == default_config(fmt) and f'backend: "{config}"' in cfg


def test_pytorch_needs_its_config_and_keeps_it(tmp_path: Path) -> None:
    bare = _file(tmp_path / "bare" / "resnet.pt")
    with pytest.raises(LayoutError, match="pytorch backend can't derive.*ship a config.pbtxt.*INPUT__0"):
        lay_out(tmp_path / "repo", "r", "pytorch", bare)
    assert not (tmp_path / "repo" / "r").exists() and not list((tmp_path / "repo").glob(".*"))
    # The model's own config beside the file: used, minus its `name` (Triton requires the folder's).
    m = tmp_path / "m"
    _file(m / "resnet.pt")
    (m / "config.pbtxt").write_text(
        'name: "resnet"\nbackend: "pytorch"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]\n'
        'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1000 ] } ]\n'
    )
    _file(m / "labels.txt", b"cat\ndog\n")
    d = lay_out(tmp_path / "repo", "resnet__isvc-2", "pytorch", m)
    tree = _tree(d)
    assert tree["1/model.pt"] == "link:resnet.pt" and tree["labels.txt"] == "link:labels.txt"
    cfg = (d / "config.pbtxt").read_text()
    assert 'name: "resnet"' not in cfg and 'name: "INPUT__0"' in cfg and 'name: "OUTPUT__0"' in cfg
    assert "max_batch_size: 8" in cfg  # the model's config wins over ours


def test_native_triton_folder_is_linked_as_it_is(tmp_path: Path) -> None:
    m = tmp_path / "m"
    _file(m / "1" / "model.savedmodel" / "saved_model.pb")
    _file(m / "2" / "model.savedmodel" / "saved_model.pb")
    (m / "config.pbtxt").write_text('name: "tfmnist"\nplatform: "tensorflow_savedmodel"\n')
    for fmt in ("tensorflow", "triton"):
        d = lay_out(tmp_path / "repo", "tf", fmt, m)
        assert _tree(d) == {"1": "link:1", "2": "link:2", "config.pbtxt": "file"}
        assert (d / "config.pbtxt").read_text() == 'platform: "tensorflow_savedmodel"\n'


def test_strip_top_level_name() -> None:
    cfg = (
        '# name: "in a comment" stays\n'
        "name:'single'\n"
        'platform: "onnxruntime_onnx"  name: "x"\n'
        'parameters { key: "name" value: { string_value: "name: \\"q\\"" } }\n'
        'input [ { name: "a" }, { name: "b" } ]\n'
        'model_name_suffix: 1\n'
    )
    out = strip_top_level_name(cfg)
    assert "'single'" not in out and '"x"' not in out
    assert '# name: "in a comment" stays' in out and 'name: "a"' in out and 'name: "b"' in out
    assert 'key: "name"' in out and 'name: \\"q\\"' in out and "model_name_suffix: 1" in out


def test_layout_refusals(tmp_path: Path) -> None:
    f = _file(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    cases: list[tuple[str, str, Path, dict[str, Any], str]] = [
        ("id", "sklearn", f, {}, "Triton has no backend for format 'sklearn'"),
        ("../up", "onnx", f, {}, "can't name a folder"),
        ("a/b", "onnx", f, {}, "can't name a folder"),
        (".hidden", "onnx", f, {}, "can't name a folder"),
        ("id", "onnx", tmp_path / "missing", {}, "does not exist"),
        ("id", "python", _file(tmp_path / "p" / "model.py"), {"allow_executable": False}, "MESHSERVE_ALLOW_EXECUTABLE_FORMATS"),
        ("id", "tensorflow", _file(tmp_path / "g" / "frozen.graphdef"), {}, "tensorflow backend can't derive"),
        ("id", "keras", _file(tmp_path / "k" / "model.h5"), {}, "Keras .h5 needs converting"),
        ("id", "triton", _file(tmp_path / "t" / "model.onnx").parent, {}, "holds no config.pbtxt"),
    ]
    _file(tmp_path / "two" / "a.onnx")
    _file(tmp_path / "two" / "b.onnx")
    cases.append(("id", "onnx", tmp_path / "two", {}, r"cannot tell which file .* a.onnx, b.onnx"))
    _file(tmp_path / "py" / "helper.py")
    _file(tmp_path / "py" / "other.py")
    cases.append(("id", "python", tmp_path / "py", {}, "needs a model.py"))
    for model_id, fmt, path, kw, match in cases:
        with pytest.raises(LayoutError, match=match):
            lay_out(repo, model_id, fmt, path, **kw)
    assert not repo.exists() or list(repo.iterdir()) == []  # nothing half-written


def test_relayout_replaces_the_folder(tmp_path: Path) -> None:
    a, b = _file(tmp_path / "a.onnx", b"a"), _file(tmp_path / "b.onnx", b"b")
    lay_out(tmp_path / "repo", "m", "onnx", a)
    d = lay_out(tmp_path / "repo", "m", "onnx", b)
    assert (d / "1" / "model.onnx").read_bytes() == b"b"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m"]
