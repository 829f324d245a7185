"""Kind: unit + integration against a protocol stand-in. NOT tested against a real Triton.

- Layout (pure, files in tmp): what the loader writes into Triton's model repository per
  modelFormat (file names, config.pbtxt content, native Triton folders, refusals).
- Client (meshserve_loader.triton.TritonClient) over real HTTP on 127.0.0.1 against
  tests/triton_standin.py, a separate process that mimics Triton's documented repository API
  (load/unload/index/health/stats, `{"error": ...}` bodies, unload finishing after its answer).
  It is a protocol stand-in, not Triton: it really loads the laid-out model.onnx with
  onnxruntime and answers inference, but knows no other backend. Triton itself can't run here
  (no package: PyPI's `tritonserver` is a placeholder, Debian has none; it is a container).
  Our built-in runtime speaks the same repository API but can't stand in: it loads from a
  `parameters.path` in the load request, and Triton's load refuses any parameter but "config"
  and "file:...", so a Triton client sends none and the model is found by name in the repository.
- Pods: a ServingRuntime like the users' servingruntime-triton.yaml is run as Triton; a local
  pod without `tritonserver` fails with the way to run it; a fake `tritonserver` on PATH (a
  script that execs the stand-in) shows the flags the loader starts Triton with.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from meshserve_testing.devmesh import free_block, free_port
from meshserve.settings import Settings
from meshserve.yamlfile import load_documents
from meshserve_loader import example_models as ex
from meshserve_loader.runtimes import parse_serving_runtime, select_runtime, serving_runtimes
from meshserve_loader.triton import (
    LayoutError, TritonClient, default_config, infer_server_type, lay_out, strip_top_level_name,
)

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "triton_standin.py"
FIXTURES = HERE.parent.parent / "shared" / "fixtures"
SEED = FIXTURES / "mnist-request-v2-rest.json"


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


# ---------------------------------------------------------------------------------------------
# (a) Layout


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


# ---------------------------------------------------------------------------------------------
# (b) and (c): the client against the protocol stand-in


async def _start_standin(repo: Path, *extra: str) -> tuple[asyncio.subprocess.Process, int]:
    """The stand-in on a port of its own choosing (port 0), read back from its first line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(STANDIN), "--repo", str(repo), "--port", "0", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=None,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not line.startswith("port "):
        await _stop(proc)
        raise RuntimeError(f"the Triton stand-in did not start: {line!r}")
    return proc, int(line.split()[1])


async def _stop(p: asyncio.subprocess.Process) -> None:
    if p.returncode is None:
        p.terminate()
        try:
            await asyncio.wait_for(p.wait(), 10)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()


@pytest.fixture
async def triton(tmp_path: Path) -> AsyncIterator[tuple[TritonClient, asyncio.subprocess.Process]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    proc, port = await _start_standin(repo, "--ready-after", "0.5")
    try:
        async with aiohttp.ClientSession() as session:
            client = TritonClient(f"http://127.0.0.1:{port}", session, repo, pid=lambda: proc.pid if proc.returncode is None else 0)
            await client.wait_ready(30)  # answers 503 for its first 0.5 s: wait_ready must wait
            yield client, proc
    finally:
        await _stop(proc)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="onnx is a test extra: run `make install`")
    return ex.write_onnx(tmp_path_factory.mktemp("pulled") / "digits-logreg.onnx")


def _seed_request() -> dict[str, Any]:
    if SEED.exists():
        return json.loads(SEED.read_text())
    from sklearn.datasets import load_digits

    return {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": load_digits().data[0].tolist()}]}


async def test_load_infer_stats_unload(triton: tuple[TritonClient, Any], onnx_model: Path) -> None:
    client, _ = triton
    mid = "sklearn-mnist__isvc-7"
    measured = await client.load(mid, {"path": str(onnx_model), "format": "onnx", "predicted_size": 1}, timeout=60)
    # The RSS delta of the stand-in's process: onnxruntime's session and arena, well above 0.
    assert measured > 0
    assert (client.repo / mid / "1" / "model.onnx").is_symlink()
    assert await client.held() == [mid]
    assert await client.stats() == {mid: {"requests": 0}}
    t0 = time.time()
    async with client.session.post(f"{client.base_url}/v2/models/{mid}/infer", json=_seed_request()) as r:
        assert r.status == 200, await r.text()
        out = {o["name"]: o for o in (await r.json())["outputs"]}
    assert out["label"]["data"] == [8] and out["label"]["datatype"] == "INT64"
    s = (await client.stats())[mid]
    assert s["requests"] == 1 and t0 - 1 <= s["last_used"] <= time.time() + 1  # Triton's own recency, in seconds
    # Triton's unload answers before the model is gone; unload() returns once it is.
    await client.unload(mid)
    assert await client.held() == [] and await client.stats() == {}
    assert not (client.repo / mid).exists()
    await client.unload(mid)  # unloading what isn't loaded is fine, as in Triton


async def test_triton_errors_name_the_model(triton: tuple[TritonClient, Any], tmp_path: Path) -> None:
    client, _ = triton
    # Triton's {"error": ...} body becomes the message, with the model's name.
    corrupt = _file(tmp_path / "bad.onnx", b"\x00not an onnx model\xff" * 10)
    with pytest.raises(RuntimeError, match=r"Triton could not load bad__isvc-1: HTTP 400: failed to load 'bad__isvc-1' version 1: .*onnx runtime error"):
        await client.load("bad__isvc-1", {"path": str(corrupt), "format": "onnx"}, timeout=30)
    assert not (client.repo / "bad__isvc-1").exists()  # the folder goes with the failure
    m = tmp_path / "resnet"
    _file(m / "resnet.pt")
    (m / "config.pbtxt").write_text('backend: "pytorch"\ninput [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]\n')
    with pytest.raises(RuntimeError, match="Triton could not load resnet__isvc-2: HTTP 400: .*not 'pytorch'"):
        await client.load("resnet__isvc-2", {"path": str(m), "format": "pytorch"}, timeout=30)
    # A layout the loader refuses never reaches Triton.
    with pytest.raises(RuntimeError, match="cannot lay out plain__isvc-3 for Triton: .*ship a config.pbtxt"):
        await client.load("plain__isvc-3", {"path": str(m / "resnet.pt"), "format": "pytorch"}, timeout=30)
    assert await client.held() == []


async def test_model_missing_after_load_is_an_error(triton: tuple[TritonClient, Any], onnx_model: Path) -> None:
    client, _ = triton
    # The stand-in answers 200 to loads of "ghost*" models but never shows them READY.
    with pytest.raises(RuntimeError, match=r"answered the load of ghost__isvc-1 but its repository index does not show it READY \(state unknown\)"):
        await client.load("ghost__isvc-1", {"path": str(onnx_model), "format": "onnx"}, timeout=30)
    assert not (client.repo / "ghost__isvc-1").exists()
    assert await client.held() == []


async def test_wait_ready_times_out_with_the_url(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    async with aiohttp.ClientSession() as session:
        c = TritonClient(f"http://127.0.0.1:{port}", session, tmp_path / "repo")
        with pytest.raises(TimeoutError, match=f"Triton at http://127.0.0.1:{port} not ready after 0.5s"):
            await c.wait_ready(0.5)


# ---------------------------------------------------------------------------------------------
# ServingRuntimes and pods


def _fixture_triton(tmp_path: Path) -> Path:
    if not (FIXTURES / "servingruntime-triton.yaml").exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    cfg = tmp_path / "config"
    cfg.mkdir()
    shutil.copy(FIXTURES / "servingruntime-triton.yaml", cfg / "servingruntime-triton.yaml")
    return cfg


def test_users_triton_servingruntime_is_run_as_triton(tmp_path: Path) -> None:
    from meshserve_loader.pod import advertised_formats, find_runtime

    cfg = _fixture_triton(tmp_path)
    docs = load_documents(cfg / "servingruntime-triton.yaml")
    (parsed,) = serving_runtimes(docs)
    assert parsed.server_type == "builtin"  # KServe's form: no builtInAdapter at all ...
    spec = find_runtime(cfg, "triton-2.x")
    assert spec.server_type == "triton"  # ... but its container is nvcr.io/nvidia/tritonserver
    assert advertised_formats(spec) == ["pytorch", "tensorflow"]
    assert select_runtime("pytorch", "", "triton-2.x", [spec]).server_type == "triton"
    # ModelMesh's form names it; other runtimes are left alone.
    named = parse_serving_runtime({"kind": "ServingRuntime", "metadata": {"name": "t"}, "spec": {"builtInAdapter": {"serverType": "triton"}}})
    assert named.server_type == "triton"
    other = [{"kind": "ServingRuntime", "metadata": {"name": "o"}, "spec": {"containers": [{"name": "server", "image": "example.com/not-triton:1"}]}}]

    class Doc:
        def __init__(self, data: Any) -> None:
            self.data = data

    o = parse_serving_runtime(other[0])
    assert infer_server_type(o, [Doc(other[0])]).server_type == "builtin"
    spi = {**other[0], "spec": {"builtInAdapter": {"serverType": "modelruntime"}, "containers": [{"image": "nvcr.io/nvidia/tritonserver:24.01-py3"}]}}
    assert infer_server_type(parse_serving_runtime(spi), [Doc(spi)]).server_type == "modelruntime"


def _settings(tmp_path: Path, cfg: Path, runs_runtime: bool) -> Settings:
    return Settings(
        config_dir=cfg, data_dir=tmp_path / "data", pod_runtimes="triton-2.x", loader_runs_runtime=runs_runtime,
        runtime_base_port=free_block(10), pod_capacity_bytes=1 << 30,
    )


async def test_local_pod_without_tritonserver_says_how_to_run_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshserve_loader.pod import build_pod

    cfg = _fixture_triton(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    s = _settings(tmp_path, cfg, runs_runtime=True)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(SystemExit) as e:
            await build_pod(s, 0, session)
    msg = str(e.value)
    rest = s.pod_ports(0)[0]
    for part in ("'triton-2.x' is Triton", "no `tritonserver` executable on PATH", "its own container", "istio/runtime-builtin.yaml",
                 f"--model-repository={(s.data_dir / 'triton' / 'pod-0').resolve()}", "--model-control-mode=explicit",
                 f"--http-port={rest}", "MESHSERVE_LOADER_RUNS_RUNTIME=false"):
        assert part in msg, msg


async def test_cluster_pod_talks_to_the_triton_container_beside_it(tmp_path: Path) -> None:
    from meshserve_loader.pod import build_pod

    s = _settings(tmp_path, _fixture_triton(tmp_path), runs_runtime=False)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
    assert isinstance(built.runtime, TritonClient) and built.process is None
    assert built.runtime.base_url == f"http://127.0.0.1:{s.pod_ports(0)[0]}"
    assert built.runtime.repo == (s.data_dir / "triton" / "pod-0").resolve() and built.runtime.pid() == 0
    assert built.pod.runtime == "triton-2.x" and built.pod.formats == ["pytorch", "tensorflow"]


async def test_local_pod_starts_tritonserver_with_our_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx_model: Path) -> None:
    """A fake `tritonserver` on PATH records its arguments and execs the stand-in, so the pod's
    own start path (pod.py -> start_triton -> RuntimeProcess) runs end to end."""
    from meshserve_loader.pod import build_pod

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "tritonserver"
    argv_file = tmp_path / "argv"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{argv_file}"\n'
        'for a in "$@"; do case "$a" in --model-repository=*) repo="${a#*=}";; --http-port=*) port="${a#*=}";; esac; done\n'
        f'exec "{sys.executable}" "{STANDIN}" --repo "$repo" --port "$port"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    s = _settings(tmp_path, _fixture_triton(tmp_path), runs_runtime=True)
    rest, grpc_port, _ = s.pod_ports(0)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
        try:
            assert built.process is not None and built.process.pid > 0
            await built.runtime.wait_ready(30)
            repo = (s.data_dir / "triton" / "pod-0").resolve()
            assert argv_file.read_text().split("\n")[:-1] == [
                f"--model-repository={repo}", "--model-control-mode=explicit", "--strict-model-config=false",
                "--strict-readiness=false", "--http-address=127.0.0.1", f"--http-port={rest}", "--grpc-address=127.0.0.1",
                f"--grpc-port={grpc_port}", f"--metrics-port={rest + 3}",
            ]
            # The pod's client measures the load in the process tree the agent started.
            size = await built.runtime.load("m__isvc-1", {"path": str(onnx_model), "format": "onnx"}, 60)
            assert size > 0 and await built.runtime.held() == ["m__isvc-1"]
        finally:
            await built.process.stop()
