"""Issue 8: every Grafana panel's PromQL returns data from a real Prometheus scraping a running mesh.

Kind: e2e. Real Prometheus (Debian's package), real mesh (session fixture), bounded load.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from meshserve_testing.tools import apt_binary
from meshserve import dashboards
from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e


def prometheus_binary() -> str:
    return apt_binary("prometheus", "prometheus")


def test_committed_dashboards_are_current() -> None:
    for name, text in dashboards.render().items():
        assert (dashboards.OUT / name).read_text() == text, f"grafana/dashboards/{name} is stale: run python -m meshserve.dashboards"


def _scrape_config(mesh: devmesh.Mesh) -> str:
    p = mesh.ports
    jobs = {
        "envoy": ([f"127.0.0.1:{p['envoy_admin_port']}"], "/stats/prometheus"),
        "meshserve-xds": ([f"127.0.0.1:{p['xds_debug_port']}"], "/metrics"),
        "meshserve-placement": ([f"127.0.0.1:{p['placement_metrics_port']}"], "/metrics"),
        "meshserve-runtime": ([f"127.0.0.1:{p['runtime_base_port'] + 10 * i}" for i in range(2)], "/metrics"),
    }
    lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s", "scrape_configs:"]
    for job, (targets, path) in jobs.items():
        lines += [f"  - job_name: {job}", f"    metrics_path: {path}", "    static_configs:", f"      - targets: {json.dumps(targets)}"]
    return "\n".join(lines) + "\n"


def _query(port: int, expr: str) -> list:
    _, body = devmesh.http_get(f"http://127.0.0.1:{port}/api/v1/query?query=" + urllib.parse.quote(expr))
    doc = json.loads(body)
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


def test_every_panel_query_returns_data(mesh: devmesh.Mesh, fixtures: Path, tmp_path: Path) -> None:
    prom = prometheus_binary()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(_scrape_config(mesh))
    port = devmesh.free_port()
    proc = subprocess.Popen(
        [prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        devmesh.wait_until(lambda: devmesh.http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 60, "prometheus ready")
        body = (fixtures / "mnist-request-proto-json.json").read_bytes()
        import urllib.request

        def infer() -> dict:
            req = urllib.request.Request(f"{mesh.rest}/v2/models/sklearn-mnist/infer", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())

        model_id = infer()["modelName"]
        # Bounded load: at most 15 s or 600 requests, spread so rate() windows see several scrapes.
        deadline = time.monotonic() + 15
        n = 0
        while time.monotonic() < deadline and n < 600:
            infer()
            n += 1
            time.sleep(0.02)
        time.sleep(4)
        empty = []
        for d in dashboards.DASHBOARDS:
            for panel in d.panels:
                for expr, _ in panel.exprs:
                    q = dashboards.scoped(expr).replace("$__rate_interval", "30s").replace("$model", model_id).replace("$cluster", ".*").replace("$namespace", ".*")
                    if not _query(port, q):
                        empty.append(f"{d.uid} / {panel.title}: {q}")
        assert not empty, "panels with no data:\n" + "\n".join(empty)
    finally:
        proc.terminate()
        proc.wait(20)
