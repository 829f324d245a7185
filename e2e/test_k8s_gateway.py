"""The gateway pod's probes and scrape targets (issue 7), with real processes: the xDS server
(`python -m meshserve_xds`, as istio/gateway.yaml runs it) against a real Valkey, and the gateway
Envoy from the bootstrap the pod's init container writes (`python -m meshserve_xds.bootstrap`).

- xds /healthz: 503 with the reason while Redis is unreachable, 200 once the first snapshot is
  built, and still 200 when Redis goes away afterwards (it serves its last snapshot).
- Envoy's metrics listener: GET /stats/prometheus answers; nothing else of the admin API does.

Everything binds 127.0.0.1 (here the stand-in for the pod IP) and is stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_testing import devmesh
from meshserve_testing.xds_harness import envoy
from meshserve_xds.resources import REST
from meshserve_xds.server import GATEWAY_GROUP

pytestmark = pytest.mark.e2e


def request(url: str, method: str = "GET", timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def healthz(port: int) -> tuple[int, dict]:
    status, body = devmesh.http_get(f"http://127.0.0.1:{port}/healthz", 2)
    return status, json.loads(body)


@pytest.fixture
def ports() -> dict[str, int]:
    base = devmesh.free_block(10)
    return {"xds_port": base, "xds_debug_port": base + 1, "gateway_rest_port": base + 2, "gateway_grpc_port": base + 3,
            "activator_rest_port": base + 4, "activator_grpc_port": base + 5, "envoy_admin_port": base + 6, "envoy_metrics_port": base + 7}


def pod_env(ports: dict[str, int], redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    env.update({f"MESHSERVE_{k.upper()}": str(v) for k, v in ports.items()})
    # What istio/gateway.yaml sets from status.podIP; loopback is the only address to bind here.
    env.update({"MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_XDS_DEBUG_HOST": "127.0.0.1", "MESHSERVE_ENVOY_METRICS_HOST": "127.0.0.1",
                "MESHSERVE_REDIS_URL": redis_url})
    return env


@pytest.fixture
def xds_process(ports: dict[str, int]) -> Iterator[tuple[devmesh.Valkey, Path]]:
    """Valkey started and killed at once (so its URL refuses connections), then xds against it."""
    with devmesh.valkey(tcp=True) as v, tempfile.TemporaryDirectory(prefix="ms-xds-") as tmp:  # the reason names host:port
        v.kill()
        log = Path(tmp) / "xds.log"
        with open(log, "wb") as lf:
            proc = subprocess.Popen([sys.executable, "-m", "meshserve_xds"], env=pod_env(ports, v.url), stdout=lf, stderr=subprocess.STDOUT)
            try:
                yield v, log
            finally:
                devmesh.stop(proc)


def test_xds_is_ready_once_it_has_a_snapshot_and_stays_ready(ports: dict[str, int], xds_process: tuple[devmesh.Valkey, Path]) -> None:
    v, log = xds_process
    http = ports["xds_debug_port"]
    try:
        status, doc = devmesh.wait_until(lambda: healthz(http), 30, "xds HTTP listener up")
        assert status == 503 and doc["status"] == "unavailable", doc
        assert "unreachable" in doc["reason"] and f"127.0.0.1:{v.port}" in doc["reason"], doc
        v.restart()
        devmesh.wait_until(lambda: healthz(http)[0] == 200, 20, "xds ready after Redis came up")
        assert "revision" in healthz(http)[1]["reason"]
        status, body = devmesh.http_get(f"http://127.0.0.1:{http}/metrics")
        assert status == 200 and b"meshserve_xds_resyncs_total" in body
        status, body = devmesh.http_get(f"http://127.0.0.1:{http}/debug/config")  # loopback: allowed
        assert status == 200 and GATEWAY_GROUP in json.loads(body)["groups"]
        # Redis goes away: the server keeps its snapshot, so the gateway pods stay ready.
        v.kill()
        devmesh.wait_until(lambda: b"state source error" in log.read_bytes(), 15, "xds noticed Redis is gone")
        assert healthz(http)[0] == 200
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise


def test_gateway_envoy_serves_only_prometheus_stats_on_its_metrics_port(ports: dict[str, int], xds_process: tuple[devmesh.Valkey, Path]) -> None:
    v, log = xds_process
    v.restart()
    devmesh.wait_until(lambda: healthz(ports["xds_debug_port"])[0] == 200, 30, "xds ready")
    with tempfile.TemporaryDirectory(prefix="ms-boot-") as tmp:
        out = Path(tmp) / "envoy.json"
        # The init container's command (istio/gateway.yaml), with the pod's environment.
        made = subprocess.run([sys.executable, "-m", "meshserve_xds.bootstrap", str(out), "meshserve-gateway-test"],
                              env=pod_env(ports, v.url), capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        bootstrap = out.read_text()
    metrics = f"http://127.0.0.1:{ports['envoy_metrics_port']}"
    with envoy(bootstrap, ports["envoy_admin_port"]) as e:
        # Our listeners came over ADS from the xds process, beside the static metrics listener.
        devmesh.wait_until(lambda: REST in e.get("/listeners"), 30, "the gateway listener from xds")
        status, body = request(f"{metrics}/stats/prometheus")
        assert status == 200 and b"envoy_server_live" in body and b"envoy_cluster_manager_cds_update_success" in body
        status, body = request(f"{metrics}/stats/prometheus?usedonly")
        assert status == 200 and b"# TYPE" in body
        for path in ("/", "/config_dump", "/clusters", "/stats", "/ready", "/server_info", "/stats/prometheus/",
                     "/stats/prometheus/../config_dump", "/stats/prometheus/..%2Fconfig_dump", "//config_dump",
                     "/stats/prometheus%2F..%2F..%2Fconfig_dump"):
            status, body = request(f"{metrics}{path}")
            assert status in (400, 404), (path, status)
            assert b"envoy_server_live" not in body and b"configs" not in body, path
        for path in ("/quitquitquit", "/healthcheck/fail", "/stats/prometheus", "/reset_counters"):
            assert request(f"{metrics}{path}", "POST")[0] == 404, path
        assert e.proc.poll() is None and e.get("/ready").strip() == "LIVE"
        # The admin API itself stays on loopback, where it was.
        boot = json.loads(bootstrap)
        assert boot["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"
