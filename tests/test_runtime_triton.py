"""Kind: unit + integration against a protocol stand-in. NOT tested against a real Triton.

- Layout: tests/test_runtime_triton_layout.py.
- Client (meshserve_loader.servers.triton.TritonClient) over real HTTP on 127.0.0.1 against
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

from meshserve.ports import release, reserve_port
from meshserve.settings import Settings
from meshserve.yamlfile import load_documents
from meshserve_loader import example_models as ex
from meshserve_loader.servers.triton import TritonAdapter, TritonClient
from meshserve_loader.serving_runtime import infer_server_type, parse_serving_runtime, select_runtime, serving_runtimes

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "triton_standin.py"
FIXTURES = HERE.parent.parent / "shared" / "fixtures"
SEED = FIXTURES / "mnist-request-v2-rest.json"



def _file(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p

# ---------------------------------------------------------------------------------------------
# The client against the protocol stand-in


async def _start_standin(repo: Path, port: int, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(STANDIN), "--repo", str(repo), "--port", str(port), *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=None,
    )


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
    port = reserve_port()  # the stand-in, like Triton, is told its port and reports none
    repo = tmp_path / "repo"
    repo.mkdir()
    proc = await _start_standin(repo, port, "--ready-after", "0.5")
    try:
        async with aiohttp.ClientSession() as session:
            client = TritonClient(f"http://127.0.0.1:{port}", session, repo, pid=lambda: proc.pid if proc.returncode is None else 0)
            await client.wait_ready(30)  # answers 503 for its first 0.5 s: wait_ready must wait
            yield client, proc
    finally:
        await _stop(proc)
        release(port)


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
    port = reserve_port()  # nothing listens there, and nothing else will meanwhile
    try:
        async with aiohttp.ClientSession() as session:
            c = TritonClient(f"http://127.0.0.1:{port}", session, tmp_path / "repo")
            with pytest.raises(TimeoutError, match=f"Triton at http://127.0.0.1:{port} not ready after 0.5s"):
                await c.wait_ready(0.5)
    finally:
        release(port)


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


def _settings(tmp_path: Path, cfg: Path, runs_runtime: bool, **kw: Any) -> Settings:
    # Ports: the default fixed ones where nothing binds; 0 (reserved ports) where Triton runs.
    return Settings(config_dir=cfg, data_dir=tmp_path / "data", pod_runtimes="triton-2.x", loader_runs_runtime=runs_runtime,
                    pod_capacity_bytes=1 << 30, **kw)


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

    s = _settings(tmp_path, _fixture_triton(tmp_path), runs_runtime=False, pod_id="triton-pod-0")
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
    client = built.server.client
    assert isinstance(built.server, TritonAdapter) and isinstance(client, TritonClient) and built.server.process is None
    assert client.base_url == "http://127.0.0.1:8080" and (built.pod.rest_port, built.pod.grpc_port) == (8080, 8081)
    assert client.repo == (s.data_dir / "triton" / "triton-pod-0").resolve() and client.pid() == 0
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
    s = _settings(tmp_path, _fixture_triton(tmp_path), runs_runtime=True, runtime_base_port=0)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
        try:
            assert built.server.process is not None and built.server.process.pid > 0
            await built.server.wait_ready(30)
            repo = (s.data_dir / "triton" / "pod-0").resolve()
            # Triton can't report ports: it is given reserved ones, which the pod advertises.
            rest, grpc_port = built.pod.rest_port, built.pod.grpc_port
            argv = argv_file.read_text().split("\n")[:-1]
            metrics = int(argv[-1].split("=", 1)[1])
            assert argv == [
                f"--model-repository={repo}", "--model-control-mode=explicit", "--strict-model-config=false",
                "--strict-readiness=false", "--http-address=127.0.0.1", f"--http-port={rest}", "--grpc-address=127.0.0.1",
                f"--grpc-port={grpc_port}", f"--metrics-port={metrics}",
            ]
            lo, _hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
            assert len({rest, grpc_port, metrics}) == 3 and all(0 < p < lo for p in (rest, grpc_port, metrics))
            # The pod's client measures the load in the process tree the agent started.
            size = await built.server.load("m__isvc-1", {"path": str(onnx_model), "format": "onnx"}, 60)
            assert size > 0 and await built.server.client.held() == ["m__isvc-1"]
        finally:
            await built.server.stop()
