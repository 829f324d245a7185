"""The TrafficRule resource: its JSON Schema (the one source of truth for its shape) and pure
validation that names file, line and field.

The schema checks shape (types, ranges, unknown fields). The TrafficRule CRD's schema is
generated from it (meshserve/rules/crd.py), so `kubectl apply` refuses what `meshserve apply` does.
Lists and strings are bounded so the CRD's CEL rules stay within the API server's cost budget. What a schema cannot say (weights
summing to 100, header syntax, models that exist, one rule per model) is checked right after,
in `parse_rule`, against the same document so every error carries a line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import jsonschema

from meshserve.headers import MODEL_ID_HEADER, VMODEL_ID_HEADER
from meshserve.yamlfile import ConfigError, Document

API_VERSION = "meshserve.io/v1alpha1"
KIND = "TrafficRule"

_DURATION = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"
_TARGET = {
    "type": "object",
    "additionalProperties": False,
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 253, "description": "InferenceService name or concrete model id"},
        "weight": {"type": "integer", "minimum": 0, "maximum": 100},
    },
}
_HEADER_MATCH = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "exact": {"type": "string"},
        "prefix": {"type": "string", "minLength": 1},
        "regex": {"type": "string", "minLength": 1, "maxLength": 1024},
        "present": {"type": "boolean"},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "meshserve TrafficRule",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": KIND},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["model"],
            "properties": {
                # The name clients call. Requests addressed to it follow this rule; its own
                # current version is the *stable* target that a rollback restores.
                "model": {"type": "string", "minLength": 1, "maxLength": 253},
                # Tried in order, first match wins; a route without `match` is the default.
                "routes": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["to"],
                        "properties": {
                            "match": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["headers"],
                                "properties": {
                                    "headers": {"type": "object", "minProperties": 1, "additionalProperties": _HEADER_MATCH},
                                },
                            },
                            "to": {"type": "array", "minItems": 1, "maxItems": 16, "items": _TARGET},
                            "sticky": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["header"],
                                "properties": {"header": {"type": "string", "maxLength": 256}},
                            },
                        },
                    },
                },
                "mirror": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["model", "percent"],
                    "properties": {
                        "model": {"type": "string", "minLength": 1, "maxLength": 253},
                        "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                    },
                },
                "canary": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["model", "steps"],
                    "properties": {
                        "model": {"type": "string", "minLength": 1, "maxLength": 253},
                        "steps": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 32,
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["weight"],
                                "properties": {
                                    "weight": {"type": "integer", "minimum": 0, "maximum": 100},
                                    # No hold: the step waits for `meshserve promote`.
                                    "hold": {"type": "string", "pattern": _DURATION},
                                },
                            },
                        },
                        "abort": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["errorRatePercent"],
                            "properties": {
                                "errorRatePercent": {"type": "number", "minimum": 0, "maximum": 100},
                                "window": {"type": "string", "pattern": _DURATION},
                                "minRequests": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                },
            },
        },
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
# RFC 9110 field-name token. Lower case only: Envoy lowercases header names, so a rule
# written `X-User` would silently never match what the user thinks it matches.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=")
_RESERVED_HEADERS = {MODEL_ID_HEADER, VMODEL_ID_HEADER, "host", "content-length"}


def parse_duration(text: str) -> float:
    m = re.match(_DURATION, text)
    if not m:
        raise ValueError(f"bad duration {text!r}")
    n = float(text[: m.start(2)])
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class Rule:
    """A validated TrafficRule. `spec` is kept as written: it is what Redis stores and what
    `plan.py` interprets, so the YAML, Redis and the gateway agree on one shape."""

    name: str
    model: str
    spec: dict[str, Any]
    file: str = ""

    def to_doc(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": self.name}, "spec": self.spec}

    def referenced_models(self) -> list[str]:
        return referenced_models(self.spec)


def is_rule(doc: Document) -> bool:
    return isinstance(doc.data, dict) and doc.data.get("kind") == KIND


def referenced_models(spec: dict[str, Any]) -> list[str]:
    out = [spec["model"]]
    for r in spec.get("routes") or []:
        out += [t["model"] for t in r["to"]]
    if spec.get("mirror"):
        out.append(spec["mirror"]["model"])
    if spec.get("canary"):
        out.append(spec["canary"]["model"])
    return list(dict.fromkeys(out))


def _schema_error(doc: Document, err: jsonschema.ValidationError) -> ConfigError:
    path = tuple(err.absolute_path)
    msg = err.message
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        if extra:
            path = path + (extra[0],)
            allowed = ", ".join(sorted(err.schema.get("properties", {}))) or "none"
            msg = f"unknown field {extra[0]!r}; allowed here: {allowed}"
    elif err.validator == "pattern" and err.schema.get("pattern") == _DURATION:
        msg = f"{err.instance!r} is not a duration; write e.g. 30s, 5m, 1h or 500ms"
    elif err.validator in ("minProperties", "maxProperties") and "exact" in err.schema.get("properties", {}):
        msg = "a header match needs exactly one of: exact, prefix, regex, present"
    return doc.error(path, msg)


def parse_rule(doc: Document, known_models: Iterable[str]) -> Rule:
    """Validate one TrafficRule document. Raises ConfigError naming file, line and field."""
    errors = sorted(_VALIDATOR.iter_errors(doc.data), key=lambda e: (len(list(e.absolute_path)), list(map(str, e.absolute_path))))
    if errors:
        # The deepest error is the most specific one ("spec.routes.0.to.1.weight"), except
        # that an unknown field is reported first: it is usually a typo that explains the rest.
        unknown = [e for e in errors if e.validator == "additionalProperties"]
        raise _schema_error(doc, (unknown or errors)[-1] if unknown else errors[-1])
    d = doc.data
    spec = d["spec"]
    known = set(known_models)

    def need_model(path: tuple[str | int, ...], name: str) -> None:
        if name not in known:
            raise doc.error(path, f"unknown model {name!r}: no InferenceService or model of that name; apply it first or fix the name")

    need_model(("spec", "model"), spec["model"])
    if spec.get("routes") and spec.get("canary"):
        raise doc.error(("spec", "canary"), "use either `routes` or `canary`, not both (a canary is itself the default route)")
    routes = spec.get("routes") or []
    for i, route in enumerate(routes):
        base: tuple[str | int, ...] = ("spec", "routes", i)
        is_default = "match" not in route
        if is_default and i != len(routes) - 1:
            raise doc.error(base, "a route without `match` is the default and must come last (later routes could never match)")
        for name, m in (route.get("match") or {}).get("headers", {}).items():
            hp = base + ("match", "headers", name)
            _check_header_name(doc, hp, name)
            if "regex" in m:
                try:
                    re.compile(m["regex"])
                except re.error as e:
                    raise doc.error(hp + ("regex",), f"not a valid regular expression: {e}") from None
                if _NOT_RE2.search(m["regex"]):
                    # Envoy uses RE2, which has no lookaround or backreferences; Envoy would
                    # reject the whole route table, so refuse it here with the reason.
                    raise doc.error(hp + ("regex",), "lookaround and backreferences are not supported (Envoy uses RE2)")
        targets = route["to"]
        seen: set[str] = set()
        for j, t in enumerate(targets):
            need_model(base + ("to", j, "model"), t["model"])
            if t["model"] in seen:
                raise doc.error(base + ("to", j, "model"), f"{t['model']!r} is listed twice in this route")
            seen.add(t["model"])
        if len(targets) == 1:
            if targets[0].get("weight", 100) != 100:
                raise doc.error(base + ("to", 0, "weight"), "a single target takes all the traffic: weight must be 100 or left out")
        else:
            missing = [j for j, t in enumerate(targets) if "weight" not in t]
            if missing:
                raise doc.error(base + ("to", missing[0]), "with several targets every target needs a weight")
            total = sum(t["weight"] for t in targets)
            if total != 100:
                raise doc.error(base + ("to",), f"weights sum to {total}, they must sum to 100")
        if "sticky" in route:
            _check_header_name(doc, base + ("sticky", "header"), route["sticky"]["header"])
            if len(targets) < 2:
                raise doc.error(base + ("sticky",), "sticky needs a split (two or more targets) to be sticky about")
    if spec.get("mirror"):
        need_model(("spec", "mirror", "model"), spec["mirror"]["model"])
        if spec["mirror"]["model"] == spec["model"]:
            raise doc.error(("spec", "mirror", "model"), "a model cannot mirror to itself")
    if spec.get("canary"):
        c = spec["canary"]
        need_model(("spec", "canary", "model"), c["model"])
        if c["model"] == spec["model"]:
            raise doc.error(("spec", "canary", "model"), "the canary must differ from the stable model (spec.model)")
        prev = -1
        for i, step in enumerate(c["steps"]):
            if step["weight"] < prev:
                raise doc.error(("spec", "canary", "steps", i, "weight"), f"steps must not go down ({prev} then {step['weight']}); a rollback does that")
            prev = step["weight"]
    return Rule(name=d["metadata"]["name"], model=spec["model"], spec=spec, file=doc.file)


def _check_header_name(doc: Document, path: tuple[str | int, ...], name: str) -> None:
    if not _HEADER_NAME.match(name):
        hint = " (write it in lower case)" if _HEADER_NAME.match(name.lower()) else ""
        raise doc.error(path, f"{name!r} is not a valid HTTP header name{hint}")
    if name in _RESERVED_HEADERS:
        raise doc.error(path, f"{name!r} is set by the gateway itself and cannot be matched on")


def check_unique(rules: list[tuple[Rule, Document]], existing: dict[str, str] | None = None) -> None:
    """One rule per name and per model, so which rule governs a request is never ambiguous.
    `existing`: model -> rule name of rules already stored (a rule may replace itself)."""
    by_name: dict[str, Rule] = {}
    by_model: dict[str, Rule] = {}
    for r, doc in rules:
        if r.name in by_name:
            raise doc.error(("metadata", "name"), f"rule {r.name!r} is also defined in {by_name[r.name].file}")
        if r.model in by_model:
            other = by_model[r.model]
            raise doc.error(("spec", "model"), f"model {r.model!r} already has rule {other.name!r} ({other.file}); merge them into one rule")
        owner = (existing or {}).get(r.model)
        if owner is not None and owner != r.name and owner not in {x.name for x, _ in rules}:
            raise doc.error(("spec", "model"), f"model {r.model!r} already has rule {owner!r} in the mesh; edit that rule or delete it first")
        by_name[r.name] = by_model[r.model] = r
