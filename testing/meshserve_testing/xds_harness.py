"""A real Envoy against an in-process ADS server: for the protocol tests and the routing bench.

The ADS server runs on its own event loop in a thread, so synchronous tests and benchmarks can
drive it (`AdsThread.call`) while Envoy, a real subprocess, talks to it over loopback gRPC.
Everything binds to 127.0.0.1 and is stopped by the context managers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import Future
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import grpc

from meshserve_testing.devmesh import stop, wait_until
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import AdsServer

T = TypeVar("T")


class AdsThread:
    """An AdsServer (with its cache) served by grpc.aio on a private event loop thread."""

    def __init__(self, port: int = 0, cache: SnapshotCache | None = None):
        self.port = port  # 0: the server binds any free port and `port` becomes the one it got
        self.loop = asyncio.new_event_loop()
        self.cache: SnapshotCache | None = cache
        self.ads: AdsServer | None = None
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="ads", daemon=True)

    def start(self) -> "AdsThread":
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        if self.cache is None:
            self.cache = SnapshotCache()
        self.ads = AdsServer(self.cache)
        self._server = grpc.aio.server(options=[("grpc.max_send_message_length", 512 << 20)])
        self.ads.add_to(self._server)  # responses sent as the bytes the streams wrote
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    def call(self, coro: Awaitable[T], timeout: float = 120) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the server's loop (the cache is not thread-safe)."""

        async def wrap() -> T:
            return fn()

        return self.call(wrap())

    def set(self, group: str, res: r.Resources) -> list[str]:
        cache = self.cache
        assert cache is not None
        return self.run(lambda: cache.set(group, res))  # on the server's loop: the cache is not thread-safe

    def stop_server(self) -> None:
        """Stop serving gRPC (streams drop) but keep the loop, to restart on the same port."""
        if self._server is not None:
            self.call(self._server.stop(0))
            self._server = None

    def restart_server(self, cache: SnapshotCache | None = None) -> None:
        self.stop_server()
        if cache is not None:
            self.cache = cache
        self.call(self._start())

    def stop(self) -> None:
        self.stop_server()

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextmanager
def ads_server(port: int = 0) -> Iterator[AdsThread]:
    a = AdsThread(port).start()
    try:
        yield a
    finally:
        a.stop()


class Envoy:
    def __init__(self, proc: subprocess.Popen[bytes], admin_port: int, log: Path):
        self.proc, self.admin_port, self.log_path = proc, admin_port, log

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def get(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(self.admin + path, timeout=timeout) as resp:
            return resp.read().decode()

    def stats(self, filter_: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.get(f"/stats?filter={filter_}").splitlines():
            k, _, v = line.partition(": ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def stat(self, name: str) -> int:
        return self.stats("^" + name.replace(".", r"\.") + "$").get(name, 0)

    def config_dump(self, resource: str) -> list[dict[str, Any]]:
        return json.loads(self.get(f"/config_dump?resource={resource}")).get("configs", [])

    def route_versions(self) -> dict[str, str]:
        return {c["route_config"]["name"]: c["version_info"] for c in self.config_dump("dynamic_route_configs")}

    def listener_port(self, name: str, timeout: float = 30) -> int:
        """The port listener `name` got, read back from the admin API: give listeners port 0
        in their xDS config (r.ListenerConfig("127.0.0.1", 0, 0)) and Envoy binds free ones."""

        def bound() -> int | None:
            for st in json.loads(self.get("/listeners?format=json")).get("listener_statuses", []):
                if st.get("name") == name:
                    return st.get("local_address", {}).get("socket_address", {}).get("port_value") or None
            return None

        return wait_for(bound, timeout, f"listener {name} bound")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def envoy_binary() -> str:
    return str(Path(sys.executable).with_name("envoy"))


@contextmanager
def envoy(bootstrap_json: str, admin_port: int = 0, concurrency: int = 1, log_level: str = "warn") -> Iterator[Envoy]:
    """A real Envoy on `bootstrap_json`. With `admin_port` 0 (the bootstrap's admin port 0 too),
    Envoy binds any free port and writes it to --admin-address-path, where it is read back."""
    with tempfile.TemporaryDirectory(prefix="ms-envoy-") as tmp:
        boot = Path(tmp) / "bootstrap.json"
        boot.write_text(bootstrap_json)
        logp = Path(tmp) / "envoy.log"
        addr = Path(tmp) / "admin-address"
        with open(logp, "wb") as logf:
            proc = subprocess.Popen(
                [envoy_binary(), "-c", str(boot), "--disable-hot-restart", "--log-level", log_level,
                 "--concurrency", str(concurrency), "--admin-address-path", str(addr)],
                stdout=logf, stderr=subprocess.STDOUT,
            )
            e = Envoy(proc, admin_port, logp)
            try:
                if not admin_port:
                    got = wait_until(lambda: proc.poll() is not None or addr.read_text().strip(), 60, "envoy admin address")
                    if proc.poll() is not None:
                        raise RuntimeError(f"envoy exited early:\n{e.log()[-3000:]}")
                    e.admin_port = int(str(got).rsplit(":", 1)[1])
                wait_until(lambda: e.get("/ready", timeout=2).strip() == "LIVE" or proc.poll() is not None, 60, "envoy ready")
                if proc.poll() is not None:
                    raise RuntimeError(f"envoy exited early:\n{e.log()[-3000:]}")
                yield e
            finally:
                stop(proc)


class Upstream:
    """A tiny HTTP server that answers every request with its own name: a stand-in pod."""

    def __init__(self, name: str):
        self.name = name
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def _answer(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                outer.hits += 1
                body = json.dumps({"upstream": outer.name, "path": self.path, "model": self.headers.get(r.MODEL_ID_HEADER)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._t = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Upstream":
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def http(url: str, timeout: float = 5, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"raw": body.decode(errors="replace")}


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_until(pred, timeout, what, interval=0.02)


def now() -> float:
    return time.monotonic()


def model_route_clusters(dump: Any, model_id: str) -> set[str]:
    """The clusters an Envoy route config dump (`/config_dump?resource=dynamic_route_configs`,
    parsed) sends REST requests for the concrete id `model_id` to, in either layout: the
    matcher tree's `/v2/models/<id>` and `/v2/models/<id>/` entries, or the REST route of the
    scoped layout's `model/<id>` RouteConfiguration. Empty when the gateway has no route
    for it (a cold model goes to the activator by the fallback)."""
    want = {r.MODELS_PREFIX + model_id, r.MODELS_PREFIX + model_id + "/"}
    out: set[str] = set()
    # The scoped layout with shared routes: the id's scope names its pod set's RouteConfiguration
    # (`gateway_route_dump` puts the scopes in the dump).
    mine = {"model/" + model_id} | {rc for rc in scope_targets(dump, model_id) if rc.startswith("pods/")}

    def walk(node: Any, own: bool = False) -> None:
        if isinstance(node, dict):
            if node.get("name") in mine and "virtual_hosts" in node:
                own = True  # the scoped layout's RouteConfiguration of this model
            match, action = node.get("match"), node.get("route")
            # Its REST route: prefix "/" (it takes /v1 OpenAI-style paths too), or /v2/models/.
            hit = own and isinstance(match, dict) and match.get("prefix") in ("/", r.MODELS_PREFIX)
            if isinstance(match, dict) and isinstance(action, dict) and (hit or match.get("prefix") in want or match.get("path") in want):
                if "cluster" in action:
                    out.add(action["cluster"])
                out.update(c["name"] for c in action.get("weighted_clusters", {}).get("clusters", []))
            for v in node.values():
                walk(v, own)
        elif isinstance(node, list):
            for v in node:
                walk(v, own)

    walk(dump)
    return out


def scope_targets(node: Any, name: str) -> set[str]:
    """The RouteConfigurations the scopes keyed on `name` name, anywhere in a dump."""
    out: set[str] = set()
    if isinstance(node, dict):
        frags = node.get("key", {}).get("fragments") if isinstance(node.get("key"), dict) else None
        if "route_configuration_name" in node and frags and frags[0].get("string_key") == name:
            out.add(node["route_configuration_name"])
        for v in node.values():
            out |= scope_targets(v, name)
    elif isinstance(node, list):
        for v in node:
            out |= scope_targets(v, name)
    return out


def gateway_route_dump(admin_url: str, timeout: float = 5) -> dict[str, Any]:
    """A gateway's RouteConfigurations and its scopes from its admin API, as one parsed dump
    for `model_route_clusters` (which finds a model's route through its scope when the scope
    names a shared RouteConfiguration)."""
    from meshserve_testing import devmesh

    routes = json.loads(devmesh.http_get(f"{admin_url}/config_dump?resource=dynamic_route_configs", timeout=timeout)[1])
    code, raw = devmesh.http_get(f"{admin_url}/config_dump?resource=dynamic_scoped_route_configs", timeout=timeout)
    routes["scopes"] = json.loads(raw).get("configs", []) if code == 200 else []
    return routes
