"""Every Grafana dashboard has `cluster` and `namespace` variables and scopes every panel's
PromQL by them. Kind: unit (the generator's output; promtool parses each query, installed from
Debian's prometheus package when missing, as e2e/test_alerts.py does)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from meshserve import dashboards
from meshserve_testing.tools import apt_binary

SCOPE = 'cluster=~"$cluster",namespace=~"$namespace"'
METRIC = re.compile(r'(?<![\w"$.])((?:meshserve|envoy)_[A-Za-z0-9_:]+|up)\b(?![(\w])')


def rendered() -> dict[str, dict]:
    return {name: json.loads(text) for name, text in dashboards.render().items()}


def test_committed_dashboards_are_current() -> None:
    for name, text in dashboards.render().items():
        assert (dashboards.OUT / name).read_text() == text, f"grafana/dashboards/{name} is stale: run python -m meshserve.dashboards"


def test_every_dashboard_has_cluster_and_namespace_variables() -> None:
    for name, d in rendered().items():
        vars_ = {v["name"]: v for v in d["templating"]["list"]}
        for v in ("cluster", "namespace"):
            assert vars_[v]["type"] == "query" and vars_[v]["query"].startswith("label_values(") and vars_[v]["query"].endswith(f", {v})"), name
            assert vars_[v]["includeAll"] and vars_[v]["allValue"] == ".*", name
        assert '$cluster' in vars_["namespace"]["query"], "namespaces of the chosen cluster"
        if "model" in vars_:
            assert SCOPE in vars_["model"]["query"]


def test_every_metric_selector_is_scoped() -> None:
    n = 0
    for name, d in rendered().items():
        for p in d["panels"]:
            for t in p["targets"]:
                expr = t["expr"]
                # Label names are not selectors: blank out label lists and braces' contents.
                masked = re.sub(r"\b(by|without)\s*\([^)]*\)", lambda m: " " * len(m.group(0)), expr)
                masked = re.sub(r"\{[^}]*\}", lambda m: "{" + " " * (len(m.group(0)) - 2) + "}", masked)
                for m in METRIC.finditer(masked):
                    n += 1
                    assert t["expr"][m.end():].startswith("{" + SCOPE), f"{name} / {p['title']}: {m.group(1)} unscoped in {t['expr']}"
    assert n >= 30


def test_scoping_keeps_functions_labels_and_ranges() -> None:
    s = dashboards.scoped('histogram_quantile(0.99, sum by (le) (rate(m_bucket{a="b"}[$__rate_interval]))) / clamp_min(sum(x), 1e-9) or vector(0)')
    assert s == ('histogram_quantile(0.99, sum by (le) (rate(m_bucket{' + SCOPE + ',a="b"}[$__rate_interval]))) '
                 '/ clamp_min(sum(x{' + SCOPE + '}), 1e-9) or vector(0)')


def test_every_scoped_query_parses(tmp_path: Path) -> None:
    promtool = apt_binary("promtool", "prometheus")
    rules = []
    for name, d in rendered().items():
        for p in d["panels"]:
            for t in p["targets"]:
                expr = t["expr"].replace("$__rate_interval", "1m").replace("$model", "m").replace("$cluster", ".*").replace("$namespace", ".*")
                rules.append({"record": f"check:{len(rules)}", "expr": expr})
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
