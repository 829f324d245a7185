"""The PrometheusRule alerts in istio/alerts.yaml fire when they should and not before, checked by
Prometheus's own `promtool test rules` on synthetic series (issue 16).

Kind: real tool (Debian's promtool), files only; no cluster, no Prometheus server."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshserve_testing.tools import apt_binary

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "istio" / "alerts.yaml"


def _alert(name: str, at: str, labels: dict[str, str] | None = None, firing: bool = True) -> dict[str, Any]:
    rule = next(r for g in yaml.safe_load(ALERTS.read_text())["spec"]["groups"] for r in g["rules"] if r["alert"] == name)
    exp = [{"exp_labels": {"severity": rule["labels"]["severity"], **(labels or {})}}] if firing else []
    return {"eval_time": at, "alertname": name, "exp_alerts": exp}


# Each case: the input series, then when the alert must be silent and when it must fire.
CASES: list[dict[str, Any]] = [
    {"interval": "15s", "input_series": [{"series": "meshserve_placement_leader", "values": "1 1 1 0x10"}],
     "alert_rule_test": [_alert("MeshservePlacementNoLeader", "1m", firing=False), _alert("MeshservePlacementNoLeader", "2m")]},
    {"interval": "1m", "input_series": [
        {"series": 'meshserve_loads_total{result="ok"}', "values": "0+10x30"},
        {"series": 'meshserve_loads_total{result="failed"}', "values": "0x10 0+5x20"}],
     "alert_rule_test": [_alert("MeshserveLoadsFailing", "9m", {"result": "failed"}, firing=False),
                         _alert("MeshserveLoadsFailing", "20m", {"result": "failed"})]},
    {"interval": "1m", "input_series": [
        {"series": 'meshserve_pod_used_bytes{pod="pod-0"}', "values": "50 50 50 150x10"},
        {"series": 'meshserve_pod_capacity_bytes{pod="pod-0"}', "values": "100x13"},
        {"series": 'meshserve_pod_used_bytes{pod="pod-1"}', "values": "90x13"},
        {"series": 'meshserve_pod_capacity_bytes{pod="pod-1"}', "values": "100x13"}],
     "alert_rule_test": [_alert("MeshservePodOverMemory", "4m", firing=False), _alert("MeshservePodOverMemory", "10m", {"pod": "pod-0"})]},
    {"interval": "1m", "input_series": [{"series": 'meshserve_xds_nacks_total{type="RouteConfiguration"}', "values": "0 0 0 1 1 1"}],
     "alert_rule_test": [_alert("MeshserveXdsNacks", "2m", firing=False), _alert("MeshserveXdsNacks", "4m", {"type": "RouteConfiguration"})]},
    {"interval": "30s", "input_series": [
        {"series": "meshserve_state_revision", "values": "10 11 12 13 14 15 16 17 18 19"},
        {"series": "meshserve_xds_state_revision", "values": "10 11 12 12 12 12 12 12 12 12"}],
     "alert_rule_test": [_alert("MeshserveGatewayConfigStale", "1m", firing=False), _alert("MeshserveGatewayConfigStale", "4m")]},
    {"interval": "1m", "input_series": [{"series": "meshserve_models_loading", "values": "5x10 5+2x30"}],
     "alert_rule_test": [_alert("MeshserveColdStartQueueGrowing", "10m", firing=False), _alert("MeshserveColdStartQueueGrowing", "35m")]},
    {"interval": "15s", "input_series": [{"series": "meshserve_redis_up", "values": "1 1 0x10"}],
     "alert_rule_test": [_alert("MeshserveRedisUnreachable", "30s", firing=False), _alert("MeshserveRedisUnreachable", "2m")]},
]


def test_every_alert_has_a_case() -> None:
    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["spec"]["groups"] for r in g["rules"]}
    tested = {t["alertname"] for c in CASES for t in c["alert_rule_test"]}
    assert names == tested, names ^ tested


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["alert_rule_test"][0]["alertname"])
def test_alert_fires_when_it_should(tmp_path: Path, case: dict[str, Any]) -> None:
    promtool = apt_binary("promtool", "prometheus")
    groups = yaml.safe_load(ALERTS.read_text())["spec"]["groups"]
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run([promtool, "check", "rules", str(full)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr  # the annotation templates too
    # Firing is what is tested here: annotations (rendered with $value) are left out of the match.
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "15s", "tests": [case]}))
    out = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
