"""The Grafana dashboards, as data: one source of truth for every panel's PromQL.

`python -m meshserve.dashboards` writes grafana/dashboards/*.json; a test checks the committed
files are current, and the Prometheus e2e test runs every query against a live mesh.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
RATE = "$__rate_interval"

# Every dashboard has `cluster` and `namespace` variables, and every metric selector in every
# panel is scoped by them (`scoped` below), so one Grafana over several clusters or installs
# shows one at a time. `namespace` is the target label the Prometheus Operator's PodMonitors add;
# `cluster` is Prometheus's external label (Thanos, Mimir, a federating Prometheus) and is
# absent on a single Prometheus, where "All" (.*) also matches series without it.
SCOPE = {"cluster": "$cluster", "namespace": "$namespace"}
SCOPE_MATCHERS = ",".join(f'{k}=~"{v}"' for k, v in SCOPE.items())
SCOPE_METRIC = "meshserve_pods"  # placement's, present wherever a mesh runs: the variables' source
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
             "inf", "nan"}
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]|[0-9][0-9.eE+-]*|[A-Za-z_:][A-Za-z0-9_:]*|\s+|.')


def scoped(expr: str) -> str:
    """`expr` with the scope matchers in every metric selector: `m` -> `m{cluster=~"$cluster",...}`,
    `m{a="b"}` -> `m{cluster=~...,a="b"}`. Function and aggregation names, keywords, label lists
    after by/without/on/ignoring, strings, ranges and numbers are left alone."""
    toks = _TOKEN.findall(expr)
    out: list[str] = []
    label_list = False  # inside by (...) / without (...) / on (...) / ignoring (...)
    for i, t in enumerate(toks):
        if label_list:
            out.append(t)
            if t == ")":
                label_list = False
            continue
        nxt = next((x for x in toks[i + 1:] if not x.isspace()), "")
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", t) and not t.isdigit():
            if t in ("by", "without", "on", "ignoring", "group_left", "group_right") and nxt == "(":
                label_list = True
                out.append(t)
            elif t.lower() in _KEYWORDS or nxt in ("(", "by", "without"):
                out.append(t)  # a keyword, or a function / aggregation (`sum by (le) (...)`)
            elif toks[i + 1:i + 2] and toks[i + 1].startswith("{"):
                body = toks[i + 1][1:-1].strip()
                toks[i + 1] = "{" + SCOPE_MATCHERS + ("," + body if body else "") + "}"
                out.append(t)
            else:
                out.append(t + "{" + SCOPE_MATCHERS + "}")
        else:
            out.append(t)
    return "".join(out)


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    panels: list[Panel]
    variables: list[dict] = field(default_factory=list)


OVERVIEW = Dashboard(
    "meshserve-overview",
    "meshserve / Mesh overview",
    [
        Panel("Runtime pods", [("meshserve_pods", "pods")], kind="stat"),
        Panel("Models managed / loaded", [("meshserve_models_managed", "managed"), ("meshserve_models_loaded", "loaded")]),
        Panel("Capacity and used bytes per pod", [("meshserve_pod_capacity_bytes", "{{pod}} capacity"), ("meshserve_pod_used_bytes", "{{pod}} used")], unit="bytes"),
        Panel("Cache fill", [("sum(meshserve_pod_used_bytes) / sum(meshserve_pod_capacity_bytes)", "used / capacity")], unit="percentunit"),
        Panel("Cache age (oldest last use of a loaded model)", [("meshserve_cache_age_seconds", "cache age"), ("meshserve_instance_lru_age_seconds", "{{pod}}")], unit="s"),
        Panel(
            "Hit ratio (requests served without a load)",
            [(f"1 - sum(rate(meshserve_activator_requests_total[{RATE}])) / clamp_min(sum(rate(envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix=~\"meshserve_.*\"}}[{RATE}])), 1e-9)", "hit ratio")],
            unit="percentunit",
        ),
        Panel("Loads and evictions", [(f"sum by (result) (rate(meshserve_loads_total[{RATE}]))", "loads {{result}}"), (f"rate(meshserve_evictions_total[{RATE}])", "evictions")], unit="ops"),
        Panel("Failing models", [("meshserve_models_failing", "failing"), ("meshserve_models_loading", "loading")]),
        Panel("Gateway requests by class", [(f"sum by (envoy_response_code_class) (rate(envoy_http_downstream_rq_xx{{envoy_http_conn_manager_prefix=\"meshserve_rest\"}}[{RATE}]))", "{{envoy_response_code_class}}xx")], unit="reqps"),
    ],
)

MODEL = Dashboard(
    "meshserve-model",
    "meshserve / Model detail",
    [
        # From the built-in runtime's per-model metrics, else from the gateway's per-route stats
        # where they are on (MESHSERVE_XDS_ROUTE_STATS: off by default, they cost ~4.5 KiB of
        # Envoy memory per loaded model), which is how MLServer and Triton models show here.
        Panel("Request rate", [(f"sum(rate(meshserve_runtime_requests_total{{model=\"$model\"}}[{RATE}])) "
                                f"or sum(rate(envoy_vhost_route_upstream_rq_total{{envoy_route=\"$model\"}}[{RATE}]))", "requests/s")], unit="reqps"),
        Panel(
            "Errors",
            [(f"sum(rate(meshserve_runtime_requests_total{{model=\"$model\",code!=\"200\"}}[{RATE}])) "
              f"or sum(rate(envoy_vhost_route_upstream_rq_xx{{envoy_route=\"$model\",envoy_response_code_class=~\"4|5\"}}[{RATE}])) or vector(0)", "errors/s")],
            unit="reqps",
        ),
        Panel(
            "Latency p50 / p99",
            [
                (f"histogram_quantile(0.5, sum by (le) (rate(meshserve_runtime_inference_seconds_bucket{{model=\"$model\"}}[{RATE}]))) "
                 f"or histogram_quantile(0.5, sum by (le) (rate(envoy_vhost_route_upstream_rq_time_bucket{{envoy_route=\"$model\"}}[{RATE}]))) / 1000", "p50"),
                (f"histogram_quantile(0.99, sum by (le) (rate(meshserve_runtime_inference_seconds_bucket{{model=\"$model\"}}[{RATE}]))) "
                 f"or histogram_quantile(0.99, sum by (le) (rate(envoy_vhost_route_upstream_rq_time_bucket{{envoy_route=\"$model\"}}[{RATE}]))) / 1000", "p99"),
            ],
            unit="s",
        ),
        Panel("Copies and where they are", [("meshserve_model_copies{model=\"$model\"}", "{{pod}} {{state}}")]),
        Panel("Its loads", [("meshserve_model_loads_total{model=\"$model\"}", "loads")]),
        Panel("Inference time inside the runtime (all models on its pods)", [(f"histogram_quantile(0.99, sum by (le) (rate(meshserve_runtime_inference_seconds_bucket[{RATE}])))", "p99")], unit="s"),
    ],
    variables=[{"name": "model", "query": f"label_values(meshserve_model_copies{{{SCOPE_MATCHERS}}}, model)"}],
)

CONTROL = Dashboard(
    "meshserve-control-plane",
    "meshserve / Control plane",
    [
        Panel("Connected gateways", [("sum(meshserve_xds_connected_gateways)", "gateways")], kind="stat"),
        Panel("xDS pushes by type", [(f"sum by (type) (rate(meshserve_xds_pushes_total[{RATE}]))", "{{type}}")], unit="ops"),
        Panel("xDS bytes pushed", [(f"sum(rate(meshserve_xds_pushed_bytes_total[{RATE}]))", "bytes/s")], unit="Bps"),
        Panel("xDS NACKs", [("sum(meshserve_xds_nacks_total) or vector(0)", "NACKs")]),
        Panel("xDS build time p99", [(f"histogram_quantile(0.99, sum by (le) (rate(meshserve_xds_build_seconds_bucket[{RATE}])))", "build p99")], unit="s"),
        Panel("Gateway ACK latency p99", [(f"histogram_quantile(0.99, sum by (le) (rate(meshserve_xds_ack_seconds_bucket[{RATE}])))", "ack p99")], unit="s"),
        Panel("State revision seen by xDS vs Redis", [("max(meshserve_xds_state_revision)", "xds"), ("meshserve_state_revision", "redis")]),
        Panel("Placement queue (models loading)", [("meshserve_models_loading", "loading")]),
        Panel("Cache-miss wait p99", [(f"histogram_quantile(0.99, sum by (le) (rate(meshserve_cache_miss_seconds_bucket[{RATE}])))", "p99")], unit="s"),
        Panel("Redis health (scrape of the placement process that reads it)", [("up{job=\"meshserve-placement\"}", "placement up"), ("meshserve_pod_heartbeat_age_seconds", "{{pod}} heartbeat age")]),
    ],
)

DASHBOARDS = [OVERVIEW, MODEL, CONTROL]


def to_grafana(d: Dashboard) -> dict:
    panels = []
    for i, p in enumerate(d.panels):
        panels.append(
            {
                "id": i + 1,
                "type": p.kind,
                "title": p.title,
                "description": p.description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": scoped(expr), "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for j, (expr, legend) in enumerate(p.exprs)
                ],
            }
        )
    templ = [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}]
    # cluster, then namespace within it: multi-select, with All (.*) also matching series that
    # lack the label (a single Prometheus has no `cluster`; `meshserve up` has neither).
    scope_vars = [
        {"name": "cluster", "query": f"label_values({SCOPE_METRIC}, cluster)", "label": "Cluster"},
        {"name": "namespace", "query": f'label_values({SCOPE_METRIC}{{cluster=~"$cluster"}}, namespace)', "label": "Namespace"},
    ]
    for v in scope_vars:
        templ.append({"name": v["name"], "label": v["label"], "type": "query", "query": v["query"], "refresh": 2,
                      "includeAll": True, "allValue": ".*", "multi": True, "current": {"text": "All", "value": "$__all"},
                      "datasource": {"type": "prometheus", "uid": "${datasource}"}})
    for v in d.variables:
        templ.append(
            {"name": v["name"], "type": "query", "query": v["query"], "refresh": 2, "datasource": {"type": "prometheus", "uid": "${datasource}"}}
        )
    return {
        "uid": d.uid,
        "title": d.title,
        "tags": ["meshserve"],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": templ},
        "panels": panels,
    }


def render() -> dict[str, str]:
    return {f"{d.uid}.json": json.dumps(to_grafana(d), indent=2) + "\n" for d in DASHBOARDS}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
