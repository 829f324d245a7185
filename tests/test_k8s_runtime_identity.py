"""Runtime pod identity in cluster mode (issue 7): a Kubernetes runtime pod is named by
MESHSERVE_POD_ID (the pod's name, from the downward API) and serves on fixed ports, while
`meshserve up` keeps `pod-<i>` with per-pod port offsets. Kind: unit, plus one integration test
that runs the two containers of a builtin pool pod (the loader and the built-in runtime, as
istio/runtime-builtin.yaml starts them) as processes against a real Valkey."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import redis

from meshserve_testing import devmesh
from meshserve.store import keys
from meshserve.model import Pod
from meshserve.settings import Settings
from meshserve_loader.__main__ import pod_index

REPO = Path(__file__).resolve().parent.parent


# --- the choice of id and ports ----------------------------------------------------------------

def test_local_pods_are_numbered_with_port_offsets() -> None:
    s = Settings(runtime_base_port=18200)
    assert not s.cluster_pod
    assert [s.pod_name(i) for i in range(3)] == ["pod-0", "pod-1", "pod-2"]
    assert [s.pod_ports(i) for i in range(3)] == [(18200, 18201, 18202), (18210, 18211, 18212), (18220, 18221, 18222)]


def test_a_cluster_pod_is_its_pod_name_on_fixed_ports_whatever_the_index() -> None:
    s = Settings(pod_id="meshserve-runtime-builtin-7", runtime_base_port=18200)
    assert s.cluster_pod and s.pod_port == 8080
    for i in (0, 3, 1000):
        assert s.pod_name(i) == "meshserve-runtime-builtin-7"
        assert s.pod_ports(i) == (8080, 8081, 8082)


def test_cluster_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_POD_ID", "meshserve-runtime-mlserver-0")
    monkeypatch.setenv("MESHSERVE_POD_PORT", "9000")
    s = Settings.from_env()
    assert (s.pod_name(0), s.pod_ports(0)) == ("meshserve-runtime-mlserver-0", (9000, 9001, 9002))


def test_meshserve_up_never_hands_a_pod_id_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MESHSERVE_POD_ID left in the shell must not give every local pod one id: `meshserve up`
    passes its settings to its children with the id blanked, over the inherited environment."""
    monkeypatch.setenv("MESHSERVE_POD_ID", "stray")
    s = Settings.from_env()
    env = {**os.environ, **s.as_env()}
    assert env["MESHSERVE_POD_ID"] == ""
    monkeypatch.setenv("MESHSERVE_POD_ID", env["MESHSERVE_POD_ID"])
    child = Settings.from_env()
    assert not child.cluster_pod and child.pod_name(1) == "pod-1"


def test_the_loaders_index() -> None:
    assert pod_index(Settings(), 2) == 2  # meshserve up: --index N
    assert pod_index(Settings(pod_id="p"), None) == 0  # a cluster pod needs none
    assert pod_index(Settings(pod_id="p"), 0) == 0
    with pytest.raises(SystemExit) as e:
        pod_index(Settings(), None)
    assert "MESHSERVE_POD_ID" in str(e.value) and "metadata.name" in str(e.value) and "--index" in str(e.value)


def test_the_loader_without_an_identity_says_what_to_set() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    out = subprocess.run([sys.executable, "-m", "meshserve_loader"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "MESHSERVE_POD_ID" in out.stderr, out.stderr


def test_the_image_entrypoint_names_the_pod_after_its_hostname(tmp_path: Path) -> None:
    """docker/runtime-entrypoint.sh, for `docker run` of the images: no ordinal arithmetic left."""
    shim = REPO / "docker" / "runtime-entrypoint.sh"
    show = [sys.executable, "-c", "import os, sys, json; print(json.dumps([os.environ['MESHSERVE_POD_ID'], sys.argv[1:]]))"]
    base = {"PATH": os.environ.get("PATH", "")}
    out = subprocess.run([str(shim), *show], env={**base, "HOSTNAME": "loader-box"}, capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout) == ["loader-box", ["--index", "0"]], out.stderr
    out = subprocess.run([str(shim), *show], env={**base, "HOSTNAME": "x", "MESHSERVE_POD_ID": "given"}, capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)[0] == "given"


# --- what the loader builds --------------------------------------------------------------------

async def test_a_cluster_builtin_pod_registers_as_its_name_on_the_fixed_ports(tmp_path: Path) -> None:
    from meshserve_loader.servers.builtin import RuntimeClient
    from meshserve_loader.pod import build_pod

    s = Settings(pod_id="meshserve-runtime-builtin-1", pod_port=8080, data_dir=tmp_path, pod_capacity_bytes=1 << 30)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
    assert built.pod.id == "meshserve-runtime-builtin-1" and (built.pod.rest_port, built.pod.grpc_port) == (8080, 8081)
    assert isinstance(built.server.client, RuntimeClient) and built.server.process is None  # its own container


def _mlserver_config(d: Path) -> Path:
    cfg = d / "config"
    cfg.mkdir()
    (cfg / "mlserver.yaml").write_text((REPO / "mesh-config" / "examples" / "runtimes" / "mlserver.yaml").read_text())
    return cfg


async def test_a_cluster_mlserver_pod_talks_to_the_mlserver_container_beside_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No venv, no process: MLServer is the container beside the loader (istio/runtime-mlserver.yaml),
    on the pod's ports, with its models dir at <data_dir>/mlserver. This ServingRuntime names no
    grpcDataEndpoint, so MLServer's own gRPC is the pod's, and the loader says what that costs
    (e2e/test_k8s_mlserver_pool.py runs the manifest's, which has the pass-through)."""
    from meshserve_loader.servers.mlserver import MLServerClient
    from meshserve_loader.pod import build_pod, mlserver_models_dir

    s = Settings(pod_id="meshserve-runtime-mlserver-0", pod_port=8080, data_dir=tmp_path / "data", config_dir=_mlserver_config(tmp_path),
                 pod_runtimes="mlserver-1.x", pod_capacity_bytes=1 << 30)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
    assert isinstance(built.server.client, MLServerClient) and built.server.process is None and built.server.client.pid() == 0
    assert built.server.client.base_url == "http://127.0.0.1:8080"
    assert built.server.client.models_dir == (tmp_path / "data" / "mlserver").resolve() == mlserver_models_dir(s, s.pod_id)
    assert built.server.client.models_dir.is_dir()
    p = built.pod
    assert (p.id, p.rest_port, p.grpc_port, p.runtime, p.formats) == ("meshserve-runtime-mlserver-0", 8080, 8081, "mlserver-1.x", ["sklearn"])
    assert "give the ServingRuntime a grpcDataEndpoint on another port" in caplog.text
    assert built.load_timeout == 90.0  # the ServingRuntime's modelLoadingTimeoutMillis
    # Local pods share a data dir: each keeps its own folder there.
    local = Settings(data_dir=tmp_path / "data")
    assert mlserver_models_dir(local, "pod-1") == (tmp_path / "data" / "mlserver" / "pod-1").resolve()


async def test_a_cluster_triton_pod_uses_the_fixed_ports_too(tmp_path: Path) -> None:
    from meshserve_loader.pod import build_pod

    cfg = tmp_path / "config"
    cfg.mkdir()
    fixture = REPO.parent / "shared" / "fixtures" / "servingruntime-triton.yaml"
    if not fixture.exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    (cfg / "triton.yaml").write_text(fixture.read_text())
    name = next(d["metadata"]["name"] for d in __import__("yaml").safe_load_all(fixture.read_text()) if d and d.get("kind") == "ServingRuntime")
    s = Settings(pod_id="meshserve-runtime-triton-0", data_dir=tmp_path / "data", config_dir=cfg, pod_runtimes=name, pod_capacity_bytes=1 << 30)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
    assert built.pod.id == "meshserve-runtime-triton-0" and (built.pod.rest_port, built.pod.grpc_port) == (8080, 8081)


async def test_the_users_modelmesh_mlserver_runtime_in_a_cluster_pool(tmp_path: Path) -> None:
    """The users' ServingRuntime written for ModelMesh (../shared/fixtures), unchanged, as the
    runtime of a cluster pool: MLServer listens where its env and grpcDataEndpoint say (REST 8002,
    gRPC 8001), so the loader talks to 8002, the pod advertises 8002 for REST, and its gRPC port
    is the loader's renaming pass-through to 8001."""
    from meshserve_loader.pod import build_pod

    fixture = REPO.parent / "shared" / "fixtures" / "servingruntime-custom-mlserver.yaml"
    if not fixture.exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "peft.yaml").write_text(fixture.read_text())
    port = devmesh.free_block(5)  # the pass-through binds the pod's gRPC port
    s = Settings(pod_id="meshserve-runtime-peft-0", pod_port=port, host="127.0.0.1", data_dir=tmp_path / "data", config_dir=cfg,
                 pod_runtimes="peft-model-server", pod_capacity_bytes=1 << 30)
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
        try:
            assert built.server.client.base_url == "http://127.0.0.1:8002"
            assert (built.pod.rest_port, built.pod.grpc_port) == (8002, port + 1)
            assert built.server.proxy.upstream == "127.0.0.1:8001"
        finally:
            await built.server.stop()


def test_a_port_in_the_runtimes_env_must_be_a_port() -> None:
    from meshserve_loader.servers.mlserver import _port_in_env

    assert _port_in_env("r", {}, "MLSERVER_HTTP_PORT") == 0
    assert _port_in_env("r", {"MLSERVER_HTTP_PORT": "8002"}, "MLSERVER_HTTP_PORT") == 8002
    with pytest.raises(SystemExit, match="MLSERVER_HTTP_PORT='80a'.*not a port number"):
        _port_in_env("r", {"MLSERVER_HTTP_PORT": "80a"}, "MLSERVER_HTTP_PORT")


# --- a builtin pool pod, both containers as the manifest starts them ---------------------------

@pytest.fixture(scope="module")
def valkey() -> Iterator[Any]:
    with devmesh.valkey() as v:
        yield v


def _manifest_commands() -> dict[str, list[str]]:
    import yaml

    docs = list(yaml.safe_load_all((REPO / "istio" / "runtime-builtin.yaml").read_text()))
    (sts,) = [d for d in docs if d and d["kind"] == "StatefulSet"]
    return {c["name"]: c["command"] for c in sts["spec"]["template"]["spec"]["containers"]}


def test_a_builtin_pool_pod_runs_as_the_manifest_starts_it(valkey: Any, tmp_path: Path) -> None:
    """The model server and the loader, with the manifest's commands and a pod's environment
    (MESHSERVE_POD_ID from the pod name, MESHSERVE_POD_PORT): the runtime serves on the fixed
    port, and the loader registers the pod under its name with those ports, serves its metrics
    on the third and heartbeats under the name."""
    cmds = _manifest_commands()
    port = devmesh.free_block(5)
    name = "meshserve-runtime-builtin-3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    env.update({"MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_POD_ID": name, "MESHSERVE_POD_PORT": str(port),
                "MESHSERVE_DATA_DIR": str(tmp_path / "data"), "MESHSERVE_REDIS_URL": valkey.url,
                "MESHSERVE_POD_RUNTIMES": "builtin", "MESHSERVE_POD_CAPACITY_BYTES": str(1 << 30), "MESHSERVE_HEARTBEAT_SECONDS": "0.2"})
    r = redis.Redis.from_url(valkey.url)
    r.flushdb()
    procs: list[subprocess.Popen[bytes]] = []
    logs = {c: tmp_path / f"{c}.log" for c in cmds}
    try:
        for c in ("model-server", "loader"):
            argv = [sys.executable if a == "python" else a for a in cmds[c]]
            procs.append(subprocess.Popen(argv, env=env, stdout=open(logs[c], "wb"), stderr=subprocess.STDOUT))
        devmesh.wait_until(lambda: devmesh.http_get(f"http://127.0.0.1:{port}/v2/health/ready", 1)[0] == 200, 60, "runtime ready on the pod port")
        raw = devmesh.wait_until(lambda: r.hget(keys.PODS, name), 60, "pod registered under its name")
        pod = Pod.from_json(raw)
        assert (pod.id, pod.host, pod.rest_port, pod.grpc_port, pod.runtime) == (name, "127.0.0.1", port, port + 1, "meshserve-builtin")
        assert r.hkeys(keys.PODS) == [name.encode()]  # no pod-0
        assert r.zscore(keys.HEARTBEATS, name) is not None
        status, body = devmesh.http_get(f"http://127.0.0.1:{port + 2}/metrics")
        assert status == 200 and b"meshserve_loader_capacity_bytes" in body
    except Exception:
        for c, p in logs.items():
            print(f"--- {c}\n{p.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        r.close()
