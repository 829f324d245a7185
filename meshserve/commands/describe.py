"""`meshserve describe KIND NAME`: everything about one object, for people, as `kubectl describe`.

Kinds: a model (model, isvc, inferenceservice, predictor: its spec, copies, last placement
decision and recent events), a runtime pod (its registration, heartbeat, copies and events) or
a rule (a TrafficRule or an InferenceService version move: spec, status, traffic now).
The data comes from describe_data.py; this module only words it.
"""

from __future__ import annotations

import time
from typing import Any

import click

from meshserve.commands import describe_data as data
from meshserve.commands import exits
from meshserve.commands.explain import decision_lines
from meshserve.commands.status import _mb, _run, _url, redis_option

MODEL_KINDS = ("model", "isvc", "inferenceservice", "predictor")
KINDS = MODEL_KINDS + ("pod", "rule", "trafficrule")


def _age(ts: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s" if s < 120 else (f"{s // 60}m" if s < 7200 else f"{s // 3600}h")


def _columns(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows under headers, each column as wide as its widest cell (kubectl's plain layout, safe to pipe)."""
    if not rows:
        return [indent + "<none>"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]]


def _events(evs: list[dict[str, Any]]) -> list[str]:
    rows = [[e["type"], e["reason"], _age(e["ts"]), e["from"] or "-", e["message"]] for e in evs]
    return ["Events:", *_columns(["TYPE", "REASON", "AGE", "FROM", "MESSAGE"], rows)]


def _flat(d: dict[str, Any], prefix: str = "") -> str:
    """A nested mapping on one line, `a.b=c, d=e`, as people read labels."""
    return ", ".join(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else f"{prefix}{k}={v}" for k, v in sorted(d.items()))


def _field(name: str, value: Any) -> str:
    return f"{name + ':':<16}{value}"


def render_model(d: dict[str, Any]) -> str:
    spec = d.get("spec") or {}
    out = [
        _field("Name", d["alias"]), _field("Kind", d["kind"]), _field("Model", d["model"]),
        _field("Status", d["summary"]),
        "Spec:",
        "  " + _field("Format", spec.get("format", "") + (f" {spec['format_version']}" if spec.get("format_version") else "")),
        "  " + _field("Runtime", spec.get("runtime") or "(chosen by format)"),
        "  " + _field("Storage", _flat(spec.get("storage") or {}) or "-"),
        "  " + _field("Min copies", spec.get("min_copies", 0)),
        "  " + _field("Max copies", spec.get("max_copies") or "unlimited"),
        "  " + _field("Pinned", spec.get("pinned", False)),
    ]
    if d.get("version_move"):
        t = d["version_move"]
        out.append(_field("Version move", f"{t['old']} -> {t['new']}: {t['phase']}" + (f" ({t['reason']})" if t.get("reason") else "")))
    rows = [[pod, c["state"], _mb(c["size"]) if c.get("size") else "-", _age(c.get("since", 0)), c.get("reason", "")]
            for pod, c in d["copies"].items()]
    out += ["Copies:", *_columns(["POD", "STATE", "SIZE", "SINCE", "REASON"], rows)]
    for pod, q in d["queued"].items():
        out.append(f"  queued on {pod}: {q['ahead']} ahead" + (" (a request is waiting)" if q["request_waiting"] else ""))
    for pod, secs in d["excluded_pods"].items():
        out.append(f"  excluded from {pod} for {secs}s more (a load failed there)")
    last = d.get("last_used_seconds_ago")
    out.append(_field("Last used", f"{last}s ago" if last is not None else "never"))
    last_decision = d.get("last_decision")
    out += ["Placement:", *("  " + line for line in decision_lines(last_decision))] if last_decision else [_field("Placement", "no decision recorded")]
    return "\n".join(out + _events(d["events"]))


def render_pod(d: dict[str, Any]) -> str:
    out = [_field("Name", d["name"])]
    p = d["pod"]
    if p is not None:
        out += [
            _field("Address", f"{p['host']}:{p['rest_port']} (gRPC {p['grpc_port']})"),
            _field("Runtime", p["runtime"]),
            _field("Formats", ", ".join(p["formats"]) or "-"),
            _field("Capacity", f"{_mb(p['used_bytes'])} used of {_mb(p['capacity_bytes'])}"),
            _field("Max loading", p["max_loading"]),
            _field("Heartbeat", f"{p['heartbeat_age_s']}s ago"),
            _field("Condition", p["condition"]),
        ]
    w = d["withdrawn"]
    if w is not None and p is None:
        out += [_field("Condition", f"withdrawn by placement {_age(w['withdrawn_at'])} ago: {w['reason']}"),
                _field("Heartbeat", f"last {_age(w['last_heartbeat'])} ago")]
    rows = [[c["alias"] or "-", c["model"], c["state"], _mb(c["size"]) if c.get("size") else "-", _age(c.get("since", 0)), c.get("reason", "")]
            for c in d["copies"]]
    out += ["Copies:", *_columns(["ALIAS", "MODEL", "STATE", "SIZE", "SINCE", "REASON"], rows)]
    return "\n".join(out + _events(d["events"]))


def render_rule(d: dict[str, Any]) -> str:
    import yaml

    from meshserve.commands.rules import _weights

    st = d["status"]
    out = [_field("Name", d["name"]), _field("Kind", d["kind"]),
           _field("Phase", st.get("phase", "") + (f" (step {int(st['step']) + 1})" if "step" in st else "")),
           _field("Since", f"{_age(st.get('since', 0))} ago" if st.get("since") else "-"),
           _field("Reason", st.get("reason") or "-"),
           _field("Traffic", _weights(d["plan"]) if d["plan"] is not None or d["kind"] == "TrafficRule" else "-"),
           "Spec:"]
    out += ["  " + line for line in yaml.safe_dump(d["spec"], sort_keys=False, default_flow_style=False).splitlines()]
    return "\n".join(out)


@click.command()
@click.argument("kind", type=click.Choice(KINDS, case_sensitive=False))
@click.argument("name")
@redis_option
def describe(kind: str, name: str, redis_url: str) -> None:
    """Everything about one object, for people: a model (model, isvc, inferenceservice,
    predictor), a runtime pod, or a rule (a TrafficRule or a version move).

    Exit status: 0 shown; 1 no such object, or Redis unreachable."""
    url = _url(redis_url)
    kind = kind.lower()
    if kind in MODEL_KINDS:
        d = _run(data.model(url, name), url)
        if d is None:
            exits.fail(f"no InferenceService, Predictor or model is registered as {name!r}; see `meshserve models`")
        click.echo(render_model(d))
    elif kind == "pod":
        d = _run(data.pod(url, name), url)
        if d is None:
            exits.fail(f"no runtime pod {name!r} is registered or withdrawn; see `meshserve status`")
        click.echo(render_pod(d))
    else:
        d = _run(data.rule(url, name), url)
        if d is None:
            exits.fail(f"no traffic rule or version move named {name!r}; see `meshserve get rules`")
        click.echo(render_rule(d))


COMMANDS = [describe]
