"""Issue 18 §4: the built-in runtime's own API is no way in. A real runtime process
(`python -m meshserve_loader.builtin`, as the loader and the Kubernetes manifest start it):

- its data port (REST and gRPC) serves inference, health and stats, and refuses the repository
  API (load, unload, index), so the storage-config can't be loaded as a `string` model and read
  back;
- the repository API is on a control port bound to 127.0.0.1, and even there a load outside the
  pod's cache, PVC root and model roots is refused;
- seen from a second network address (a network namespace as the pod, the test as a peer on the
  pod network): the data port answers, the control port can't be reached, a load fails.

Kind: integration (real runtime process; the namespace test needs root and `ip netns`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from meshserve_testing import devmesh
from meshserve.settings import Settings
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

SECRET = "AKIA-not-a-real-secret-3f9e"
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).encode()


def _pod_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data dir, a string model in its PVC root, a storage-config with a secret outside it)."""
    data = tmp_path / "data"
    model = data / "pvc" / "vol" / "hello.txt"
    model.parent.mkdir(parents=True)
    model.write_text("hello from the pvc")
    secret = tmp_path / "storage-config"
    secret.write_text(json.dumps({"s3": {"type": "s3", "secret_access_key": SECRET}}))
    return data, model, secret


def _post(url: str, body: bytes = b"{}", timeout: float = 10.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _load_body(path: Path) -> bytes:
    return json.dumps({"parameters": {"path": str(path), "format": "string"}}).encode()


def _start(argv_prefix: list[str], env: dict[str, str], log: Path, *args: str) -> "subprocess.Popen[bytes]":
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    full.update(env)
    with open(log, "wb") as f:
        return subprocess.Popen([*argv_prefix, sys.executable, "-m", "meshserve_loader.builtin", "--index", "0", *args],
                                env=full, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[dict[str, int], Path, Path]]:
    """As the loader starts it locally with MESHSERVE_RUNTIME_BASE_PORT=0: every listener on a
    port the kernel picked, written to the ports file once all listen."""
    data, model, secret = _pod_files(tmp_path)
    ports_file = tmp_path / "ports.json"
    proc = _start([], {"MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_DATA_DIR": str(data)},
                  tmp_path / "runtime.log", "--ports-file", str(ports_file))
    try:
        devmesh.wait_until(lambda: ports_file.exists() or proc.poll() is not None, 60, "runtime listening")
        assert proc.poll() is None, (tmp_path / "runtime.log").read_text()[-3000:]
        ports = json.loads(ports_file.read_text())
        assert devmesh.http_get(f"http://127.0.0.1:{ports['rest']}/v2/health/ready", 10)[0] == 200
        yield ports, model, secret
    finally:
        devmesh.stop(proc)


def test_data_port_refuses_the_repository_api_and_the_control_port_confines_paths(runtime: tuple[dict[str, int], Path, Path]) -> None:
    ports, model, secret = runtime
    rest, grpc_port = ports["rest"], ports["grpc"]
    data = f"http://127.0.0.1:{rest}"

    # The attack, on the data port: refused, nothing loaded, nothing to read back.
    code, body = _post(f"{data}/v2/repository/models/leak/load", _load_body(secret))
    assert code == 403 and SECRET not in body.decode(), body
    assert _post(f"{data}/v2/repository/models/leak/unload")[0] == 403
    assert _post(f"{data}/v2/repository/index")[0] == 403
    code, body = _post(f"{data}/v2/models/leak/infer", BODY)
    assert code == 404 and SECRET not in body.decode()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        req = pb.RepositoryModelLoadRequest(model_name="leak")
        req.parameters["path"].string_param = str(secret)
        req.parameters["format"].string_param = "string"
        for call, msg in ((stub.RepositoryModelLoad, req), (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="leak")),
                          (stub.RepositoryIndex, pb.RepositoryIndexRequest())):
            with pytest.raises(grpc.RpcError) as e:
                call(msg, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The control port: the same load is refused for its path; one from the PVC root is served.
    control = f"http://127.0.0.1:{ports['control']}"
    code, body = _post(f"{control}/v2/repository/models/leak/load", _load_body(secret))
    assert code == 403 and "outside this runtime's model roots" in json.loads(body)["error"]
    assert _post(f"{control}/v2/repository/models/leak/load", _load_body(model.parent / ".." / ".." / ".." / ".." / secret.name))[0] == 403
    code, body = _post(f"{control}/v2/repository/models/hello/load", _load_body(model))
    assert code == 200, body
    code, body = _post(f"{data}/v2/models/hello/infer", BODY)
    assert code == 200 and "hello from the pvc" in body.decode()
    # Read-only endpoints stay on the data port (placement polls them there).
    assert devmesh.http_get(f"{data}/v2/health/ready")[0] == 200
    code, body = devmesh.http_get(f"{data}/v2/meshserve/stats")
    assert code == 200 and set(json.loads(body)) == {"hello"}
    assert _post(f"{control}/v2/repository/models/hello/unload")[0] == 200


# --- from a second network address ----------------------------------------------------------

def _netns_unusable() -> str:
    if os.geteuid() != 0:
        return "needs root to make a network namespace"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"ms-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` is not usable here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


@pytest.fixture
def pod_netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, pod address, peer address): a namespace standing for the pod, joined to the
    test's own namespace by a veth pair on a /30 made for this test only."""
    why = _netns_unusable()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    ns, host_if, pod_if = f"ms-pod-{tag}", f"msh{tag}", f"msp{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    peer, pod = f"10.251.{octet}.1", f"10.251.{octet}.2"
    cmds = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if],
        ["ip", "link", "set", pod_if, "netns", ns],
        ["ip", "addr", "add", f"{peer}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", ns, "addr", "add", f"{pod}/30", "dev", pod_if],
        ["ip", "-n", ns, "link", "set", pod_if, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"{' '.join(c)} failed: {r.stderr.strip()}")
        yield ns, pod, peer
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # takes its peer with it
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_peer_on_the_pod_network_reaches_inference_but_cannot_load(pod_netns: tuple[str, str, str], tmp_path: Path) -> None:
    ns, pod_ip, _peer = pod_netns
    data, model, secret = _pod_files(tmp_path)
    # In cluster mode, as istio/runtime-builtin.yaml starts it: MESHSERVE_HOST is the pod IP.
    s = Settings(pod_id="meshserve-runtime-builtin-0", pod_port=8080, data_dir=data)
    rest, grpc_port, _ = s.pod_ports(0)
    proc = _start(["ip", "netns", "exec", ns], {"MESHSERVE_HOST": pod_ip, "MESHSERVE_POD_ID": s.pod_id, "MESHSERVE_POD_PORT": "8080",
                                                "MESHSERVE_DATA_DIR": str(data)}, tmp_path / "runtime.log")
    try:
        devmesh.wait_until(lambda: devmesh.http_get(f"http://{pod_ip}:{rest}/v2/health/ready", 1)[0] == 200 or proc.poll() is not None,
                           60, "runtime ready from the peer")
        assert proc.poll() is None, (tmp_path / "runtime.log").read_text()[-3000:]

        # The peer: the data port answers, the repository API there is refused.
        code, body = _post(f"http://{pod_ip}:{rest}/v2/repository/models/leak/load", _load_body(secret))
        assert code == 403 and SECRET not in body.decode()
        with grpc.insecure_channel(f"{pod_ip}:{grpc_port}") as ch:
            req = pb.RepositoryModelLoadRequest(model_name="leak")
            req.parameters["path"].string_param = str(secret)
            with pytest.raises(grpc.RpcError) as e:
                pbg.GRPCInferenceServiceStub(ch).RepositoryModelLoad(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The control port is not on the pod address at all.
        import socket

        control = s.pod_control_port(0)
        with socket.socket() as sock:
            sock.settimeout(5)
            assert sock.connect_ex((pod_ip, control)) != 0

        # The loader's view, from inside the pod's namespace: loopback reaches the control port.
        inside = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import sys, urllib.request as u;"
             f"r = u.urlopen(u.Request('http://127.0.0.1:{control}/v2/repository/models/hello/load', data=sys.argv[1].encode(), method='POST'), timeout=30);"
             "print(r.status)", _load_body(model).decode()],
            capture_output=True, text=True, timeout=60,
        )
        assert inside.stdout.strip() == "200", inside.stderr
        code, body = _post(f"http://{pod_ip}:{rest}/v2/models/hello/infer", BODY)
        assert code == 200 and "hello from the pvc" in body.decode()
        assert devmesh.http_get(f"http://{pod_ip}:{rest}/v2/meshserve/stats")[0] == 200
    finally:
        devmesh.stop(proc)
