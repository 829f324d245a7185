"""Start real meshes and stores on loopback ports: for tests, benchmarks and demos.

Everything binds to 127.0.0.1 and is always stopped (context managers), so a running
`make up` and any number of test meshes can share one machine.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from meshserve import ports

REPO = Path(__file__).resolve().parents[2]


def inference_service(name: str, model_format: str, storage: str) -> str:
    """An InferenceService in the users' form (KServe v1beta1, ModelMesh mode), for test and
    benchmark mesh-configs; `storage` is the predictor model's storage lines, as made by
    `pvc_storage` or `uri_storage`."""
    return f"""apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name}
  annotations:
    serving.kserve.io/deploymentMode: ModelMesh
spec:
  predictor:
    model:
      modelFormat:
        name: {model_format}
{storage}
"""


def pvc_storage(pvc: str, path: str) -> str:
    return f"      storage:\n        parameters: {{type: pvc, name: {pvc}}}\n        path: {path}"


def uri_storage(uri: str) -> str:
    return f"      storageUri: {uri}"


def stop(proc: "subprocess.Popen[bytes] | subprocess.Popen[str]", grace: float = 10) -> None:
    """Stop a process started for a test or benchmark: SIGTERM, then SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    """A reserved port (meshserve.ports) for a test server that can't bind port 0 and report
    the port it got (one told its port on the command line or in a config file)."""
    return ports.reserve_port()


def free_block(size: int = 100) -> int:
    """A reserved base port with `size` consecutive ports after it (meshserve.ports)."""
    return ports.reserve_block(size)


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not true within {timeout}s" + (f" (last error: {last_exc})" if last_exc else ""))


def announced(proc: "subprocess.Popen[str]", pattern: str, timeout: float, what: str) -> "re.Match[str]":
    """The first match of `pattern` in the output of `proc` (started with stdout=PIPE, text,
    stderr into stdout): how a server bound to port 0 tells the port it got. The output is read
    to its end in a thread, so the pipe never fills and blocks the server."""
    lines: "queue.Queue[str]" = queue.Queue()

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    seen: list[str] = []

    def found() -> "re.Match[str] | str | None":
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                return "exited" if proc.poll() is not None else None
            seen.append(line)
            if m := re.search(pattern, line):
                return m

    got = wait_until(found, timeout, what)
    if not isinstance(got, re.Match):
        raise RuntimeError(f"{what}: the process exited at start:\n{''.join(seen)[-2000:]}")
    return got


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class Valkey:
    port: int  # 0: no TCP port, the unix socket only
    dir: Path
    proc: subprocess.Popen[bytes]
    password: str = ""
    socket: str = ""

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.socket:
            return f"unix://{auth}{self.socket}?db=0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def restart(self) -> None:
        self.proc = _spawn_valkey(self.port, self.dir, self.password, self.socket)


def _spawn_valkey(port: int, d: Path, password: str = "", sock: str = "") -> subprocess.Popen[bytes]:
    from meshserve.up import valkey_binary

    argv = [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--protected-mode", "yes"]
    if sock:
        argv += ["--unixsocket", sock, "--unixsocketperm", "700"]
    if password:
        argv += ["--requirepass", password]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(unix_socket_path=sock, password=password or None) if sock else redis.Redis(port=port, password=password or None)
    wait_until(lambda: proc.poll() is not None or r.ping(), 20, f"valkey on {sock or port}")
    r.close()
    if proc.poll() is not None:
        raise RuntimeError(f"valkey on {sock or port} exited at start ({proc.returncode})")
    return proc


@contextmanager
def valkey(dir: Path | None = None, password: str = "", tcp: bool = False) -> Iterator[Valkey]:
    """A Valkey for a test, always stopped. By default it listens on a unix socket only: Valkey
    can't bind an ephemeral TCP port and report it (`--port 0` turns TCP off), and every client
    of a test Valkey is redis-py (in the test or in our processes), which takes a unix:// URL.
    `tcp`: on a reserved TCP port instead (meshserve.ports), for a test that needs host:port."""
    with tempfile.TemporaryDirectory(prefix="ms-valkey-") as tmp:
        d = Path(dir or tmp)
        sock = "" if tcp else str(Path(tmp) / "valkey.sock")  # in the short temp dir: a socket path is at most 107 bytes
        port = ports.reserve_port() if tcp else 0
        try:
            v = Valkey(port, d, _spawn_valkey(port, d, password, sock), password, sock)
            try:
                yield v
            finally:
                if v.proc.poll() is None:
                    v.proc.terminate()
                    try:
                        v.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        v.proc.kill()
        finally:
            if port:
                ports.release(port)


@dataclass
class Mesh:
    """A `meshserve up` subprocess on its own ports and data directory."""

    env: dict[str, str]
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway_rest_port']}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['gateway_grpc_port']}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['envoy_admin_port']}"

    @property
    def redis_url(self) -> str:
        return self.env.get("MESHSERVE_REDIS_URL") or f"redis://127.0.0.1:{self.ports['redis_port']}/0"

    def pod_rest(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports['runtime_base_port'] + 10 * i}"

    def pod_control(self, i: int) -> str:
        """Built-in runtime pod i's control listener (repository API; Settings.pod_control_port)."""
        return f"http://127.0.0.1:{self.ports['runtime_base_port'] + 10 * i + 4}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def pids(self) -> dict[str, int]:
        """Current pid of each component (`meshserve up` rewrites the file on every restart)."""
        import json

        return json.loads((self.data_dir / "pids.json").read_text())

    def signal(self, name: str, sig: int) -> int:
        pid = self.pids()[name]
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 30) -> int:
        return wait_until(lambda: self.pids()[name] != old_pid and self.pids()[name], timeout, f"{name} restarted")


def mesh_env(data_dir: Path, config_dir: Path | None = None, pods: int = 2, **extra: object) -> tuple[dict[str, str], dict[str, int]]:
    base = free_block(60)
    p = {
        "gateway_rest_port": base,
        "gateway_grpc_port": base + 1,
        "envoy_admin_port": base + 2,
        "xds_port": base + 3,
        "xds_debug_port": base + 4,
        "activator_rest_port": base + 5,
        "activator_grpc_port": base + 6,
        "placement_metrics_port": base + 7,
        "redis_port": base + 8,
        "runtime_base_port": base + 20,
    }
    env = {f"MESHSERVE_{k.upper()}": str(v) for k, v in p.items()}
    env["MESHSERVE_DATA_DIR"] = str(data_dir)
    env["MESHSERVE_CONFIG_DIR"] = str(config_dir or REPO / "mesh-config")
    env["MESHSERVE_PODS"] = str(pods)
    for k, v in extra.items():
        env[f"MESHSERVE_{k.upper()}"] = str(v)
    return env, p


@contextmanager
def mesh(config_dir: Path | None = None, pods: int = 2, timeout: float = 120, **extra: object) -> Iterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="ms-mesh-") as tmp:
        data = Path(tmp) / "data"
        # `meshserve up` is told its ports (every component, Valkey and the runtimes' base+N):
        # one reserved block (meshserve.ports), given back once the mesh has stopped.
        env, p = mesh_env(data, config_dir, pods, **extra)
        m = Mesh(env, data, ports=p, log_path=Path(tmp) / "mesh.log")
        with open(m.log_path, "wb") as logf:
            m.proc = subprocess.Popen(
                [sys.executable, "-m", "meshserve.cli", "up"],
                cwd=str(REPO), env={**os.environ, **env}, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_until(lambda: "meshserve is up" in m.log() or m.proc.poll() is not None, timeout, "mesh up")
                if m.proc.poll() is not None:
                    raise RuntimeError(f"meshserve up exited early:\n{m.log()[-4000:]}")
                yield m
            finally:
                stop_mesh(m)
                ports.release(p["gateway_rest_port"])


@contextmanager
def s3_server(timeout: float = 30) -> Iterator[str]:
    """A real S3-compatible server (moto in server mode, a separate process) on 127.0.0.1, on
    a port of its own choosing (port 0, read back from its start-up line); yields its endpoint
    URL and always stops it. Any credentials are accepted."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = moto_url(proc, timeout)
        wait_until(lambda: proc.poll() is not None or http_get(url + "/moto-api/")[0] == 200, timeout, "moto server")
        if proc.poll() is not None:
            raise RuntimeError("moto server exited at start: is moto[server] installed (`make install`)?")
        yield url
    finally:
        stop(proc)


def moto_url(proc: "subprocess.Popen[str]", timeout: float = 30) -> str:
    """The URL a moto server started with `-p 0` announces (werkzeug's " * Running on URL")."""
    return announced(proc, r"Running on (https?://127\.0\.0\.1:\d+)", timeout, "moto server's port")[1]


def stop_mesh(m: Mesh) -> None:
    if m.proc is not None and m.proc.poll() is None:
        m.proc.send_signal(signal.SIGINT)
        try:
            m.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)
