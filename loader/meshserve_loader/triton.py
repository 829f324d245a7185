"""Triton Inference Server as the pod's runtime, through the KServe v2 model repository API.

The loader lays out each model in Triton's model repository the way Triton expects it,

    <repo>/<model id>/config.pbtxt           (only when the format needs one)
    <repo>/<model id>/<version>/<model file>  (model.onnx, model.pt, model.savedmodel/, model.plan, model.py)

with symlinks to the pulled files (the disk cache holds the bytes once), then calls
`POST /v2/repository/models/{id}/load` (Triton runs with `--model-control-mode=explicit`, so it
loads nothing else) and `.../unload`, lists what it holds with `POST /v2/repository/index`, and
waits for `GET /v2/health/ready`. The file names and the modelFormat -> backend mapping follow
KServe ModelMesh's Triton adapter; a model folder that already holds a `config.pbtxt` is taken as
a Triton model folder and used as it is, minus the config's `name` (Triton requires the name to
match the folder, which is the concrete model id here).

Triton's load request takes no parameters of ours: it accepts only "config" and "file:..."
parameters (any other is an error), so the path and format travel through the layout alone.

Size: Triton reports no per-model memory, so the size is the resident-memory delta of Triton's
process tree when the agent runs Triton itself; when Triton is its own container (cluster mode)
the loader cannot see its processes and the prediction is reported instead (load returns 0).
Recency comes from Triton's own per-model statistics (`GET /v2/models/stats`).

Triton is never run on these machines: there is no Triton to install here (PyPI's `tritonserver`
is a placeholder, Debian has no package); it runs as the container nvcr.io/nvidia/tritonserver.
The client is tested against a protocol stand-in (tests/triton_standin.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import aiohttp

from meshserve_loader.memory import tree_rss_bytes
from meshserve_loader.mlserver import LayoutError, _error_text

if TYPE_CHECKING:
    from meshserve.settings import Settings
    from meshserve.yamlfile import Document
    from meshserve_loader.process import RuntimeProcess
    from meshserve_loader.runtimes import RuntimeSpec

log = logging.getLogger("meshserve.loader.triton")

__all__ = ["FORMATS", "LayoutError", "TritonClient", "default_config", "infer_server_type", "lay_out", "start_triton"]

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


# ---------------------------------------------------------------------------------------------
# Which ServingRuntimes are Triton


def infer_server_type(spec: "RuntimeSpec", docs: Iterable["Document"]) -> "RuntimeSpec":
    """A ServingRuntime with no builtInAdapter.serverType whose container is Triton (the users'
    servingruntime-triton.yaml: KServe's form, image nvcr.io/nvidia/tritonserver) is run as a
    Triton runtime. Every other runtime is returned unchanged."""
    if spec.server_type != "builtin":
        return spec
    for doc in docs:
        d = doc.data
        if not isinstance(d, Mapping) or d.get("kind") != "ServingRuntime" or (d.get("metadata") or {}).get("name") != spec.name:
            continue
        s = d.get("spec") or {}
        if (s.get("builtInAdapter") or {}).get("serverType"):
            return spec
        for c in s.get("containers") or []:
            image = str((c or {}).get("image") or "")
            repo = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
            if repo == "tritonserver":
                return dataclasses.replace(spec, server_type="triton")
    return spec


# ---------------------------------------------------------------------------------------------
# The client the agent drives


@dataclass
class TritonClient:
    base_url: str
    session: aiohttp.ClientSession
    repo: Path  # Triton's --model-repository, as this process sees it (the same path in both containers)
    pid: Callable[[], int] = lambda: 0  # Triton's process when the agent runs it, for the RSS delta (0: unknown)
    allow_executable: bool = True
    unload_wait: float = 10.0  # Triton's unload returns before the model is gone; wait this long for it
    kind: str = "triton"

    def __post_init__(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        # Loads measured by RSS can't overlap; unmeasured ones (Triton in its own container) can.
        self._measure_lock = asyncio.Lock()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while True:
            try:
                async with self.session.get(f"{self.base_url}/v2/health/ready") as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except aiohttp.ClientError as e:
                last = str(e) or type(e).__name__
            if loop.time() > deadline:
                raise TimeoutError(f"Triton at {self.base_url} not ready after {timeout:g}s ({last})")
            await asyncio.sleep(0.2)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        path = Path(str(params["path"]))
        fmt = str(params.get("format", ""))
        try:
            lay_out(self.repo, model_id, fmt, path, self.allow_executable)
        except (LayoutError, OSError) as e:
            raise RuntimeError(f"cannot lay out {model_id} for Triton: {e}") from None
        pid = self.pid()
        if pid:
            async with self._measure_lock:
                before = tree_rss_bytes(pid)
                await self._load(model_id, timeout)
                return max(tree_rss_bytes(pid) - before, 0)
        await self._load(model_id, timeout)
        return 0  # not measurable from here: the agent reports the prediction

    async def _load(self, model_id: str, timeout: float) -> None:
        try:
            # No body: Triton's load takes only "config" and "file:" parameters.
            async with self.session.post(
                f"{self.base_url}/v2/repository/models/{model_id}/load", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"Triton could not load {model_id}: HTTP {r.status}: {_error_text(await r.text())}")
            entry = (await self._index()).get(model_id)
            if entry is None or entry.get("state") != "READY":
                how = f"state {entry.get('state') or 'unknown'}" + (f": {entry['reason']}" if entry and entry.get("reason") else "") if entry else "not listed"
                raise RuntimeError(f"Triton answered the load of {model_id} but its repository index does not show it READY ({how})")
        except RuntimeError:
            await self._forget(model_id)  # Triton holds nothing for it, and the folder goes
            raise
        except BaseException:
            # Timed out or cancelled: Triton may still be loading it. The folder goes; the agent
            # watches for a late finish and unloads it then (Agent._unload_quietly).
            shutil.rmtree(self.repo / model_id, ignore_errors=True)
            raise

    async def _forget(self, model_id: str) -> None:
        try:
            async with self.session.post(
                f"{self.base_url}/v2/repository/models/{model_id}/unload", timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            log.debug("unload of failed load %s: %s", model_id, e)
        shutil.rmtree(self.repo / model_id, ignore_errors=True)

    async def unload(self, model_id: str) -> None:
        async with self.session.post(f"{self.base_url}/v2/repository/models/{model_id}/unload") as r:
            ok = r.status == 200
            err = "" if ok else f"HTTP {r.status}: {_error_text(await r.text())}"
        if not ok and model_id in await self.held():
            raise RuntimeError(f"Triton could not unload {model_id}: {err}")
        # Triton's unload returns before the model is gone: wait (bounded), so the memory is
        # free when we report it free.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unload_wait
        while model_id in await self.held():
            if loop.time() > deadline:
                log.warning("Triton still lists %s READY %gs after its unload", model_id, self.unload_wait)
                break
            await asyncio.sleep(0.1)
        shutil.rmtree(self.repo / model_id, ignore_errors=True)

    async def _index(self) -> dict[str, dict[str, Any]]:
        """name -> index entry; a READY version wins over the others of the same model."""
        async with self.session.post(f"{self.base_url}/v2/repository/index", json={}) as r:
            if r.status != 200:
                raise RuntimeError(f"Triton's repository index failed: HTTP {r.status}: {_error_text(await r.text())}")
            doc = await r.json(content_type=None)
        out: dict[str, dict[str, Any]] = {}
        for m in doc if isinstance(doc, list) else []:
            if isinstance(m, dict) and m.get("name") and (m["name"] not in out or m.get("state") == "READY"):
                out[str(m["name"])] = m
        return out

    async def held(self) -> list[str]:
        try:
            index = await self._index()
        except RuntimeError as e:
            log.warning("%s", e)
            return []
        return sorted(n for n, m in index.items() if m.get("state") == "READY")

    async def stats(self) -> dict[str, Any]:
        """The models Triton holds, with its own request counts and last inference time."""
        held = await self.held()
        if not held:
            return {}
        per_model: dict[str, dict[str, Any]] = {}
        try:
            async with self.session.get(f"{self.base_url}/v2/models/stats") as r:
                doc = await r.json(content_type=None) if r.status == 200 else {}
        except (aiohttp.ClientError, ValueError) as e:
            log.debug("Triton model statistics: %s", e)
            doc = {}
        for s in (doc.get("model_stats") if isinstance(doc, dict) else None) or []:
            name = s.get("name") if isinstance(s, dict) else None
            if name not in held:
                continue
            cur = per_model.setdefault(name, {"requests": 0})
            cur["requests"] += int(s.get("inference_count") or 0)
            last = float(s.get("last_inference") or 0) / 1000  # Triton: ms since the epoch
            if last > cur.get("last_used", 0):
                cur["last_used"] = last
        return {m: per_model.get(m, {}) for m in held}


# ---------------------------------------------------------------------------------------------
# Starting it (pod.py)


def repository_dir(settings: "Settings", pod_id: str) -> Path:
    """Triton's --model-repository for a pod. In a cluster, the pod's Triton container must be
    started with this same path, on the volume it shares with the loader."""
    return (settings.data_dir / "triton" / pod_id).resolve()


def triton_argv(exe: str, repo: Path, host: str, rest: int, grpc_port: int, metrics_port: int) -> list[str]:
    return [
        exe,
        f"--model-repository={repo}",
        "--model-control-mode=explicit",  # load and unload only on our orders
        "--strict-model-config=false",  # auto-complete what a config.pbtxt leaves out (deprecated, still read)
        "--strict-readiness=false",  # ready means the server, not "every model loaded"
        f"--http-address={host}",
        f"--http-port={rest}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
    ]


def no_triton_message(runtime: str, settings: "Settings", index: int) -> str:
    rest, grpc_port, _ = settings.pod_ports(index)
    repo = repository_dir(settings, f"pod-{index}")
    return (
        f"runtime {runtime!r} is Triton, and this loader was asked to run it itself (MESHSERVE_LOADER_RUNS_RUNTIME=true, "
        "as `meshserve up` does), but there is no `tritonserver` executable on PATH. Triton can't be installed as a "
        "package here (PyPI's `tritonserver` is a placeholder and Debian has none): it runs as its own container, "
        "nvcr.io/nvidia/tritonserver. In a cluster that container is the runtime pool's model server beside the loader "
        "sidecar (the template is istio/runtime-builtin.yaml; docs/design/loader.md). To point this loader at a Triton "
        f"you run yourself: start it with --model-repository={repo} (the same path, shared with this loader) "
        f"--model-control-mode=explicit --strict-model-config=false --strict-readiness=false --http-port={rest} "
        f"--grpc-port={grpc_port}, reachable at {settings.host}, and run the loader with MESHSERVE_LOADER_RUNS_RUNTIME=false."
    )


async def start_triton(
    settings: "Settings", index: int, spec: "RuntimeSpec", session: aiohttp.ClientSession
) -> tuple[TritonClient, "RuntimeProcess | None"]:
    """The client for pod `index`'s Triton, and its process when the agent runs it (local mode:
    a `tritonserver` on PATH). Otherwise Triton is its own container, reached where every runtime
    container is: settings.host on the pod's REST port."""
    from meshserve_loader.process import RuntimeProcess

    rest, grpc_port, _ = settings.pod_ports(index)
    pod_id = f"pod-{index}"
    url = f"http://{settings.host}:{rest}"
    repo = repository_dir(settings, pod_id)
    if not settings.loader_runs_runtime:
        log.info("runtime %s is Triton in its own container at %s, model repository %s", spec.name, url, repo)
        return TritonClient(url, session, repo, allow_executable=settings.allow_executable_formats), None
    exe = shutil.which("tritonserver")
    if exe is None:
        raise SystemExit(no_triton_message(spec.name, settings, index))
    # A new Triton holds nothing: folders left by an earlier run would only linger.
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True, exist_ok=True)
    process = RuntimeProcess(
        spec.name, triton_argv(exe, repo, settings.host, rest, grpc_port, rest + 3), dict(spec.env),
        log_path=settings.data_dir / f"{pod_id}-triton.log",
    )
    await process.start()
    return TritonClient(url, session, repo, pid=lambda: process.pid, allow_executable=settings.allow_executable_formats), process
