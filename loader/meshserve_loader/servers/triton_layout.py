"""Triton's model repository, laid out by the loader (pure apart from the files it writes).

    <repo>/<model id>/config.pbtxt           (only when the format needs one)
    <repo>/<model id>/<version>/<model file>  (model.onnx, model.pt, model.savedmodel/, model.plan, model.py)

with symlinks to the pulled files (the disk cache holds the bytes once). The file names and the
modelFormat -> backend mapping follow KServe ModelMesh's Triton adapter; a model folder that
already holds a `config.pbtxt` is taken as a Triton model folder and used as it is, minus the
config's `name` (Triton requires the name to match the folder, which is the concrete model id).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from meshserve_loader.servers.mlserver import LayoutError

__all__ = ["CONFIG", "EXECUTABLE", "FORMATS", "LayoutError", "TritonFormat", "default_config", "lay_out", "normalise_format", "strip_top_level_name"]

CONFIG = "config.pbtxt"
# Files the loader or other runtimes keep beside a model; never part of a Triton model.
# (config.pbtxt is read on its own, never linked.)
_IGNORED = {"model-settings.json", "_schema.json", "config.pbtxt"}
_HEADER = "# Written by meshserve's loader; Triton auto-completes the rest (inputs, outputs).\n"


@dataclass(frozen=True)
class TritonFormat:
    backend: str
    file_name: str  # what Triton looks for in a version folder when the model is one file
    dir_name: str = ""  # ... when the model is a folder (a TensorFlow SavedModel)
    suffixes: tuple[str, ...] = ()  # how to tell the model file among others in a folder
    config: str = ""  # written when the model ships no config.pbtxt ("" = none needed)
    needs_config: bool = False  # the backend cannot auto-complete: the model must ship its own


# KServe modelFormat -> Triton backend and file names (ModelMesh's triton adapter:
# modelTypeToBackendMapping, modelTypeToFileNameMapping, modelTypeToDirNameMapping).
FORMATS: dict[str, TritonFormat] = {
    # max_batch_size 0 keeps the onnxruntime backend's auto-complete on (it skips auto-complete
    # when max_batch_size, inputs or outputs are given) and takes the model's shapes as they are.
    "onnx": TritonFormat("onnxruntime", "model.onnx", "", (".onnx",), 'backend: "onnxruntime"\nmax_batch_size: 0\n'),
    # TorchScript keeps no input/output metadata: Triton's pytorch backend can't auto-complete.
    "pytorch": TritonFormat("pytorch", "model.pt", "", (".pt", ".pth", ".torchscript"), needs_config=True),
    # A SavedModel folder auto-completes; a single file is a GraphDef, which needs a config.
    "tensorflow": TritonFormat("tensorflow", "model.graphdef", "model.savedmodel", (".graphdef", ".pb")),
    "keras": TritonFormat("tensorflow", "", "model.savedmodel"),  # SavedModel folders only (no .h5 conversion)
    "tensorrt": TritonFormat("tensorrt", "model.plan", "", (".plan", ".engine", ".trt")),
    # The python backend can't be told from model.py alone; the model's auto_complete_config
    # (if it has one) declares inputs and outputs.
    "python": TritonFormat("python", "model.py", "", (".py",), 'backend: "python"\n'),
    # Already a Triton model folder (config.pbtxt and version folders), as KServe's "triton" format.
    "triton": TritonFormat("", "", needs_config=True),
}
# Formats whose files run the model's own code when loaded (docs/security.md).
EXECUTABLE = {"python"}


def normalise_format(fmt: str) -> str:
    # ModelMesh's rule: case-insensitive, anything after ':' (a version) dropped.
    return fmt.split(":", 1)[0].strip().lower()


def default_config(fmt: str) -> str:
    """The config.pbtxt the loader writes for a model of `fmt` that ships none ("" = none)."""
    spec = FORMATS.get(normalise_format(fmt))
    return _HEADER + spec.config if spec and spec.config else ""


# ---------------------------------------------------------------------------------------------
# Layout (pure apart from the files it writes)


def _check_id(model_id: str) -> None:
    if not model_id or model_id != Path(model_id).name or model_id.startswith(".") or "\x00" in model_id or "\\" in model_id:
        raise LayoutError(f"model id {model_id!r} can't name a folder in Triton's model repository")


def _entries(d: Path) -> list[Path]:
    return sorted(e for e in d.iterdir() if not e.name.startswith(".") and e.name not in _IGNORED)


def _versions(entries: Iterable[Path]) -> list[Path]:
    """The numeric version folders, when every folder is one (ModelMesh's largestNumberDir rule)."""
    dirs = [e for e in entries if e.is_dir()]
    if dirs and all(e.name.isdigit() for e in dirs):
        return sorted(dirs, key=lambda e: int(e.name))
    return []


_NAME = re.compile(r"""name\s*:?\s*("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[^\s,;{}\[\]]+)\s*[,;]?""")


def strip_top_level_name(pbtxt: str) -> str:
    """config.pbtxt without its top-level `name` field (nested names, of inputs and outputs,
    stay). Triton then names the model after its folder, the concrete model id."""
    out: list[str] = []
    depth, i, n = 0, 0, len(pbtxt)
    start_of_token = True
    while i < n:
        c = pbtxt[i]
        if c in "\"'":  # a string: copy it whole
            j = i + 1
            while j < n and pbtxt[j] != c:
                j += 2 if pbtxt[j] == "\\" else 1
            out.append(pbtxt[i : j + 1])
            i, start_of_token = j + 1, False
            continue
        if c == "#":  # a comment, to the end of the line
            j = pbtxt.find("\n", i)
            j = n if j < 0 else j
            out.append(pbtxt[i:j])
            i = j
            continue
        if depth == 0 and start_of_token and pbtxt.startswith("name", i) and not _ident(pbtxt[i + 4 : i + 5]):
            m = _NAME.match(pbtxt, i)
            if m:
                i = m.end()
                continue
        if c in "{[<":
            depth += 1
        elif c in "}]>":
            depth -= 1
        start_of_token = not (c.isalnum() or c in "_.")
        out.append(c)
        i += 1
    return "".join(out)


def _ident(c: str) -> bool:
    return bool(c) and (c.isalnum() or c == "_")


def _model_source(path: Path, fmt: str, spec: TritonFormat) -> tuple[str, Path, list[Path]]:
    """(version, the model file or folder, companions to link beside it) for pulled files."""
    if path.is_file():
        return "1", path, []
    if not path.is_dir():
        raise LayoutError(f"model path {path} does not exist")
    version = "1"
    entries = _entries(path)
    versions = _versions(entries)
    if versions:  # <path>/<n>/...: the newest version, as ModelMesh does
        path = versions[-1]
        version, entries = path.name, _entries(path)
    if spec.dir_name and (path / "saved_model.pb").exists():
        return version, path, []
    if spec.backend == "python":
        if len(entries) == 1 and entries[0].is_file():
            return version, entries[0], []
        if not (path / "model.py").is_file():
            raise LayoutError(f"a python model folder needs a model.py (Triton's python backend); {path} has {_names(entries)}")
        return version, path, []
    if len(entries) == 1:
        e = entries[0]
        if e.is_dir() and not (spec.dir_name and e.name.endswith(".savedmodel")):
            v, src, comp = _model_source(e, fmt, spec)
            return (v if v != "1" else version), src, comp
        return version, e, []
    matches = [e for e in entries if e.is_file() and (e.name == spec.file_name or e.suffix in spec.suffixes)]
    if len(matches) != 1:
        want = "/".join(spec.suffixes) or "model"
        raise LayoutError(
            f"cannot tell which file in {path} is the {fmt} model (expected one {want} file; found {_names(entries)}); "
            f"name it {spec.file_name or 'as Triton expects'} or lay the folder out for Triton with a config.pbtxt"
        )
    return version, matches[0], [e for e in entries if e != matches[0]]


def _names(entries: Iterable[Path]) -> str:
    return ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries) or "nothing"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def _place(tmp: Path, version: str, src: Path, companions: list[Path], fmt: str, spec: TritonFormat) -> None:
    vdir = tmp / version
    vdir.mkdir(parents=True, exist_ok=True)
    if spec.backend == "python" and src.is_dir():
        for e in _entries(src):  # model.py and whatever it imports
            _link(e, vdir / e.name)
        return
    if src.is_dir():
        if not spec.dir_name:
            raise LayoutError(f"{src} is a folder, but a {fmt} model for Triton is one file ({spec.file_name})")
        _link(src, vdir / spec.dir_name)
    else:
        if not spec.file_name:
            raise LayoutError(
                f"{src.name}: a single-file {fmt} model is not supported for Triton (Keras .h5 needs converting to a SavedModel first)"
            )
        _link(src, vdir / spec.file_name)
    for c in companions:  # e.g. an ONNX model's external weights, which it names relative to itself
        _link(c, vdir / c.name)


def lay_out(repo: Path, model_id: str, fmt: str, path: Path, allow_executable: bool = True) -> Path:
    """Write `<repo>/<model_id>/` for Triton from the pulled files at `path`, atomically (the
    folder appears whole or not at all). Returns the folder. Raises LayoutError saying what to fix."""
    _check_id(model_id)
    name = normalise_format(fmt)
    spec = FORMATS.get(name)
    if spec is None:
        raise LayoutError(f"Triton has no backend for format {fmt!r} (meshserve maps {', '.join(sorted(FORMATS))})")
    if name in EXECUTABLE and not allow_executable:
        raise LayoutError(
            f"format {name!r} runs the model's own code in Triton and executable formats are refused here; "
            "set MESHSERVE_ALLOW_EXECUTABLE_FORMATS=true if you trust the model's source"
        )
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / model_id
    tmp = repo / f".{model_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        native = path / CONFIG if path.is_dir() else None
        if native is not None and native.is_file():
            config = strip_top_level_name(native.read_text())
            entries = _entries(path)
            if _versions(entries):  # already Triton's layout: link it as it is
                for e in entries:
                    _link(e, tmp / e.name)
            else:
                if not spec.file_name and not spec.dir_name:
                    raise LayoutError(f"{path} has a config.pbtxt but no version folder (1/, 2/, ...) holding the model")
                version, src, companions = _model_source(path, name, spec)
                _place(tmp, version, src, companions, name, spec)
                for c in companions:  # labels files named in the config sit beside it
                    _link(c, tmp / c.name)
            (tmp / CONFIG).write_text(config)
        else:
            if name == "triton":
                raise LayoutError(f"format 'triton' means a Triton model folder, and {path} holds no config.pbtxt")
            version, src, companions = _model_source(path, name, spec)
            if spec.needs_config or (name == "tensorflow" and src.is_file()):
                what = "inputs named after forward()'s arguments or INPUT__0.., outputs OUTPUT__0.." if name == "pytorch" else "inputs and outputs"
                raise LayoutError(
                    f"Triton's {spec.backend} backend can't derive a {name} model's configuration: ship a config.pbtxt "
                    f"({what}) in the model's folder beside the model file, or in Triton's layout (config.pbtxt, 1/{spec.file_name})"
                )
            _place(tmp, version, src, companions, name, spec)
            if spec.config:
                (tmp / CONFIG).write_text(_HEADER + spec.config)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
