"""TrafficRule objects from the API server: validation, what Redis should hold, and `.status`.

Pure. A TrafficRule object goes through `schema.parse_rule`, exactly as a file given to `meshserve
apply` does, so a rule the CRD let through but the CLI would refuse (an unknown model, a header
name, two rules for one model) gets `status.phase: Invalid` with the CLI's message and is not
written to Redis. The controller owns only the rules it wrote: their stored document carries
`metadata.namespace` (its namespace), while a rule `meshserve apply` wrote straight into Redis
(embedded mode) carries none and is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from meshserve.k8s.objects import key_of
from meshserve.rules import plan as pl
from meshserve.rules import schema
from meshserve.yamlfile import ConfigError, Document

GROUP = "meshserve.io"
VERSION = "v1alpha1"
PLURAL = "trafficrules"
INVALID = "Invalid"  # status.phase of a rule refused by validation (not in Redis)
PENDING = "Pending"  # written to Redis, no live status read back yet
STATUS_FIELDS = ("phase", "message", "step", "steps", "canaryWeight", "observedGeneration")


@dataclass
class RuleVerdict:
    obj: dict[str, Any]
    rule: schema.Rule | None
    message: str = ""  # why it was refused

    @property
    def name(self) -> str:
        return key_of(self.obj)[1]


def document_of(obj: dict[str, Any]) -> Document:
    """The object as `parse_rule` reads a file: the API server's metadata (uid, managedFields,
    resourceVersion, ...) and status left out; errors name `k8s:TrafficRule/<ns>/<name>`."""
    ns, name = key_of(obj)
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in ("name", "namespace", "labels", "annotations")}
    data = {"apiVersion": obj.get("apiVersion", schema.API_VERSION), "kind": obj.get("kind", schema.KIND), "metadata": meta,
            "spec": obj.get("spec")}
    return Document(f"k8s:{schema.KIND}/{ns}/{name}", data, None)


def judge(objs: Iterable[dict[str, Any]], known_models: set[str], foreign_owners: dict[str, str],
          current: set[str] = frozenset()) -> list[RuleVerdict]:  # type: ignore[assignment]
    """Validate every TrafficRule. One rule per model: of two rules naming one model, the one
    already in Redis (`current`) wins, else the older object, and the other is refused, so a new
    rule never displaces one that routes traffic now. A model whose rule came from elsewhere
    (`foreign_owners`: model -> rule name, rules not written by this controller) is refused."""
    out: list[RuleVerdict] = []
    by_model: dict[str, str] = {}

    def order(o: dict[str, Any]) -> tuple[bool, str, str]:
        name = key_of(o)[1]
        return name not in current, str((o.get("metadata") or {}).get("creationTimestamp") or ""), name

    for obj in sorted(objs, key=order):
        doc = document_of(obj)
        try:
            rule = schema.parse_rule(doc, known_models)
        except ConfigError as e:
            out.append(RuleVerdict(obj, None, f"{e.field}: {e.message}" if e.field else e.message))
            continue
        other = by_model.get(rule.model) or (foreign_owners.get(rule.model) if foreign_owners.get(rule.model) != rule.name else None)
        if other:
            out.append(RuleVerdict(obj, None, f"spec.model: model {rule.model!r} already has rule {other!r}; edit that rule or delete it first"))
            continue
        by_model[rule.model] = rule.name
        out.append(RuleVerdict(obj, rule))
    return out


def stored_doc(rule: schema.Rule, namespace: str) -> dict[str, Any]:
    """What Redis holds for a rule from the cluster: the CLI's document plus its namespace."""
    d = rule.to_doc()
    d["metadata"]["namespace"] = namespace
    return d


def owned(doc: dict[str, Any], namespace: str) -> bool:
    return (doc.get("metadata") or {}).get("namespace") == namespace


def status_of(v: RuleVerdict, live: dict[str, Any] | None) -> dict[str, Any]:
    """`.status` for one TrafficRule: the rule's live state in Redis (phase, canary step and
    weight, why), or Invalid with the validation message."""
    gen = (v.obj.get("metadata") or {}).get("generation")
    out: dict[str, Any] = {}
    if v.rule is None:
        out = {"phase": INVALID, "message": v.message}
    else:
        live = live or {}
        out = {"phase": live.get("phase") or PENDING, "message": live.get("reason") or ""}
        canary = v.rule.spec.get("canary")
        if canary and live:
            out["step"] = min(int(live.get("step", 0)), len(canary["steps"]) - 1) + 1
            out["steps"] = len(canary["steps"])
            out["canaryWeight"] = pl.canary_weight(v.rule.spec, live)
    if isinstance(gen, int):
        out["observedGeneration"] = gen
    return out
