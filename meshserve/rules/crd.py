"""The TrafficRule CustomResourceDefinition, generated from the one schema `meshserve apply`
validates with (meshserve/rules/schema.py `SCHEMA`).

`python -m meshserve.rules.crd` writes istio/crds/trafficrule.yaml; a test checks the committed
file is current, and another that a set of bad rules is refused by both the CLI and the CRD's
schema at the same field.

Kubernetes' structural-schema rules, and how each JSON Schema feature the CLI uses maps:

| JSON Schema (schema.py) | CRD openAPIV3Schema |
|---|---|
| `additionalProperties: false` | dropped: structural schemas may not say it. The API server prunes unknown fields, and `kubectl apply` (its default `--validate=strict`) refuses them: `unknown field "spec.foo"` |
| `const` (apiVersion, kind) | dropped: the URL fixes group, version and kind |
| `exclusiveMinimum: 0` (a number, 2020-12) | `minimum: 0` + `exclusiveMinimum: true` (OpenAPI 3.0's boolean) |
| `metadata` (name pattern, labels, annotations) | `type: object`: the API server checks metadata itself (a DNS-1123 subdomain name, the same rule as schema.py's pattern) |
| `$schema`, `title` | dropped |

What `parse_rule` checks after the schema (weights, defaults last, RE2, ...) is, where CEL can
say it, an `x-kubernetes-validations` rule with the CLI's message (`RULES` below). The API server
refuses a CRD whose CEL rules it estimates too costly, so every list and string a rule walks is
bounded in schema.py (maxItems, maxLength). Left to the CLI and to the controller, which runs
`parse_rule` on every TrafficRule and reports a refusal as `status.phase: Invalid` with the
CLI's message:
- header names in `match.headers`: they are map keys, whose length a structural schema can't
  bound, so a CEL rule over them would exceed the cost budget;
- that a regex compiles (CEL has no such function);
- everything that needs other objects: models that exist, one rule per model.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from meshserve.rules import schema

GROUP, VERSION = schema.API_VERSION.split("/")
PLURAL, SINGULAR, SHORT = "trafficrules", "trafficrule", ["tr"]
OUT = Path(__file__).resolve().parent.parent.parent / "istio" / "crds" / "trafficrule.yaml"

_HEADER_NAME_RE = schema._HEADER_NAME.pattern

# (path of the schema node the rule sits on: property names, `items`, `additionalProperties`, CEL rule, message, fieldPath or None).
# Messages are the CLI's (schema.parse_rule), so `kubectl apply` and `meshserve apply` say the same.
# Only standard CEL plus Kubernetes' list library (`sum`, `isSorted`, Kubernetes 1.25+). A guard
# is `a ? true : b`, never `a || b`, where b would fail without a: strict on every evaluator.
RULES: list[tuple[tuple[str, ...], str, str, str | None]] = [
    (("spec",), "!(has(self.routes) && has(self.canary))",
     "use either `routes` or `canary`, not both (a canary is itself the default route)", ".canary"),
    (("spec",), "!has(self.mirror) ? true : self.mirror.model != self.model",
     "a model cannot mirror to itself", ".mirror.model"),
    (("spec",), "!has(self.canary) ? true : self.canary.model != self.model",
     "the canary must differ from the stable model (spec.model)", ".canary.model"),
    (("spec", "routes"), "size(self.filter(r, !has(r.match))) == 0 || "
                         "(size(self.filter(r, !has(r.match))) == 1 && !has(self[size(self) - 1].match))",
     "a route without `match` is the default and must come last (later routes could never match)", None),
    (("spec", "routes", "items"), "self.to.all(t, self.to.exists_one(u, u.model == t.model))",
     "a model is listed twice in this route", ".to"),
    (("spec", "routes", "items"), "size(self.to) != 1 || !has(self.to[0].weight) ? true : self.to[0].weight == 100",
     "a single target takes all the traffic: weight must be 100 or left out", ".to"),
    (("spec", "routes", "items"), "size(self.to) < 2 || self.to.all(t, has(t.weight))",
     "with several targets every target needs a weight", ".to"),
    (("spec", "routes", "items"), "size(self.to) < 2 || !self.to.all(t, has(t.weight)) ? true : self.to.map(t, t.weight).sum() == 100",
     "weights must sum to 100", ".to"),
    (("spec", "routes", "items"), "!has(self.sticky) || size(self.to) >= 2",
     "sticky needs a split (two or more targets) to be sticky about", ".sticky"),
    (("spec", "routes", "items", "sticky"), f'self.header.matches(r"{_HEADER_NAME_RE}")',
     "not a valid HTTP header name: lower case letters, digits and !#$%&'*+.^_`|~-", ".header"),
    (("spec", "routes", "items", "match", "headers", "additionalProperties"),
     f'!has(self.regex) ? true : !self.regex.matches(r"{schema._NOT_RE2.pattern}")',
     "lookaround and backreferences are not supported (Envoy uses RE2)", ".regex"),
    (("spec", "canary", "steps"), "self.map(s, s.weight).isSorted()",
     "steps must not go down; a rollback does that", None),
]
# Rules that carry a value in the CLI's message ("weights sum to 90, ...") say it in CEL too.
MESSAGE_EXPRESSIONS = {
    "weights must sum to 100": "'weights sum to ' + string(self.to.map(t, t.weight).sum()) + ', they must sum to 100'",
}

STATUS: dict[str, Any] = {
    "type": "object",
    "description": "Written by `meshserve controller` (the status subresource) from the rule's live state in Redis.",
    "properties": {
        "phase": {"type": "string", "description": "Active, Progressing, Paused, Promoted, Aborted, RolledBack; Invalid when refused"},
        "message": {"type": "string", "description": "Why the rule is in its phase (an abort's error rate, a validation error)"},
        "step": {"type": "integer", "description": "Canary: the current step, from 1"},
        "steps": {"type": "integer", "description": "Canary: how many steps"},
        "canaryWeight": {"type": "integer", "description": "Canary: percent of traffic on the canary now"},
        "observedGeneration": {"type": "integer", "format": "int64"},
    },
}

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Canary", "type": "integer", "jsonPath": ".status.canaryWeight", "description": "percent on the canary"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural(s: Any) -> Any:
    """A JSON Schema (draft 2020-12, as schema.py writes it) as a Kubernetes structural schema."""
    if isinstance(s, list):
        return [structural(v) for v in s]
    if not isinstance(s, dict):
        return s
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k in ("$schema", "title"):
            continue
        if k == "additionalProperties":
            if v is False:
                continue  # unknown fields: pruned, and refused by kubectl's --validate=strict
            out[k] = structural(v)
        elif k == "const":
            out["type"] = "string" if isinstance(v, str) else out.get("type")
            out["enum"] = [v]
        elif k == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = v, True
        elif k == "properties":
            out[k] = {n: structural(p) for n, p in v.items()}
        else:
            out[k] = structural(v)
    if ("properties" in out or "additionalProperties" in out) and "type" not in out:
        out["type"] = "object"
    return out


def _walk(root: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The schema node at `path`: names are properties; `items` and `additionalProperties` are themselves."""
    node = root
    for p in path:
        node = node[p] if p in ("items", "additionalProperties") else node["properties"][p]
    return node


def open_api_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema: SCHEMA made structural, CEL rules added, status beside spec."""
    src = copy.deepcopy(schema.SCHEMA)
    out = structural(src)
    props = out["properties"]
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    props["status"] = STATUS
    out.pop("required", None)
    out["required"] = ["spec"]
    for path, rule, message, field_path in RULES:
        v: dict[str, Any] = {"rule": rule, "message": message}
        if message in MESSAGE_EXPRESSIONS:
            v["messageExpression"] = MESSAGE_EXPRESSIONS[message]
        if field_path:
            v["fieldPath"] = field_path
        _walk(out, path).setdefault("x-kubernetes-validations", []).append(v)
    out["description"] = ("Traffic rule for one model name: header routes, weighted splits, a mirror or a progressive "
                          "canary (docs/design/traffic.md). Generated from meshserve/rules/schema.py.")
    return out


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "meshserve"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": schema.KIND, "listKind": schema.KIND + "List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT, "categories": ["meshserve"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": open_api_schema()},
            }],
        },
    }


HEADER = ("# GENERATED by `python -m meshserve.rules.crd` from meshserve/rules/schema.py: do not edit.\n"
          "# tests/test_trafficrule_crd.py checks it is current.\n")


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=1000)


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
