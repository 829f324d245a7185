"""The TrafficRule CRD (istio/crds/trafficrule.yaml) is generated from the schema `meshserve
apply` validates with, and refuses what the CLI refuses, at the same field.

How the CRD side is checked without an API server: its openAPIV3Schema with jsonschema's
Draft 4 validator (OpenAPI 3.0's semantics, e.g. a boolean exclusiveMinimum), made strict as
`kubectl apply --validate=strict` is (unknown fields fail, as tests/test_manifests.py does for
the other CRDs), then its `x-kubernetes-validations` CEL rules with cel-python, with Kubernetes'
list functions `sum` and `isSorted` written out here. Kind: unit (files only, no cluster).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from meshserve.rules import crd, schema
from meshserve.yamlfile import ConfigError, load_documents

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "mesh-config" / "examples"
KNOWN = {"a", "b", "c"}


def test_committed_crd_is_current() -> None:
    assert crd.OUT.read_text() == crd.render(), "istio/crds/trafficrule.yaml is stale: run python -m meshserve.rules.crd"


def test_crd_is_a_valid_structural_crd() -> None:
    doc = yaml.safe_load(crd.OUT.read_text())
    kubernetes_validate.validate(doc, "1.30", strict=True)
    (v,) = doc["spec"]["versions"]
    assert v["subresources"] == {"status": {}} and doc["spec"]["group"] == "meshserve.io" and v["name"] == "v1alpha1"

    def walk(s: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(s, dict):
            yield path, s
            for k, sub in (s.get("properties") or {}).items():
                yield from walk(sub, f"{path}.{k}")
            for k in ("items", "additionalProperties"):
                if isinstance(s.get(k), dict):
                    yield from walk(s[k], f"{path}[{k}]")

    for path, node in walk(v["schema"]["openAPIV3Schema"], ""):
        # Kubernetes' structural-schema rules: a type everywhere, no $ref / const / false
        # additionalProperties, properties and additionalProperties never together.
        assert "type" in node, path
        assert not {"$ref", "const", "$schema", "allOf", "oneOf", "anyOf", "not"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array" and path.startswith(".spec"):
            assert "maxItems" in node, f"{path}: CEL cost needs bounded lists"


# --- the CRD as the API server would apply it ----------------------------------------------

def _strict(s: Any) -> Any:
    """As tests/test_manifests.py `strict`: unknown fields fail (kubectl's --validate=strict)."""
    if isinstance(s, dict):
        out = {k: _strict(v) for k, v in s.items() if k != "x-kubernetes-validations"}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(s, list):
        return [_strict(v) for v in s]
    return s


OPENAPI = yaml.safe_load(crd.OUT.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
# metadata is the API server's (name: a DNS-1123 subdomain, the rule schema.py's pattern says).
_STRUCTURAL = jsonschema.Draft4Validator(_strict({**OPENAPI, "properties": {k: v for k, v in OPENAPI["properties"].items() if k != "metadata"}}))
_CEL = celpy.Environment()
# Kubernetes' CEL list library (k8s.io/apiserver/pkg/cel/library/lists.go), as the API server has it.
_K8S_FUNCTIONS = {
    "sum": lambda xs: celpy.celtypes.IntType(sum(int(x) for x in xs)),
    "isSorted": lambda xs: celpy.celtypes.BoolType(list(xs) == sorted(xs)),
}


def _cel_errors(s: dict[str, Any], obj: Any, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for v in s.get("x-kubernetes-validations") or []:
        prog = _CEL.program(_CEL.compile(v["rule"]), functions=_K8S_FUNCTIONS)
        if not prog.evaluate({"self": celpy.json_to_cel(obj)}):
            where = ".".join(path + tuple(filter(None, (v.get("fieldPath") or "").split("."))))
            msg = v["message"]
            if v.get("messageExpression"):
                msg = str(_CEL.program(_CEL.compile(v["messageExpression"]), functions=_K8S_FUNCTIONS)
                          .evaluate({"self": celpy.json_to_cel(obj)}))
            yield where, msg
    if isinstance(obj, dict):
        for k, sub in (s.get("properties") or {}).items():
            if k in obj:
                yield from _cel_errors(sub, obj[k], path + (k,))
        if isinstance(s.get("additionalProperties"), dict):
            for k, val in obj.items():
                yield from _cel_errors(s["additionalProperties"], val, path + (k,))
    if isinstance(obj, list) and isinstance(s.get("items"), dict):
        for i, val in enumerate(obj):
            yield from _cel_errors(s["items"], val, path + (str(i),))


def crd_errors(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for each refusal: structural first; CEL only on a well-typed object,
    as the API server runs it."""
    body = {k: v for k, v in doc.items() if k != "metadata"}
    out = []
    for e in _STRUCTURAL.iter_errors(body):
        path = tuple(map(str, e.absolute_path))
        if e.validator == "additionalProperties":
            path += tuple(sorted(set(e.instance) - set(e.schema.get("properties", {}))))[:1]
        out.append((".".join(path), e.message))
    if out:
        return out
    return list(_cel_errors(OPENAPI, body, ()))


def cli_error(text: str) -> ConfigError:
    (doc,) = load_documents("rule.yaml", text)
    with pytest.raises(ConfigError) as e:
        schema.parse_rule(doc, KNOWN)
    return e.value


HEAD = "apiVersion: meshserve.io/v1alpha1\nkind: TrafficRule\nmetadata: {name: r}\nspec:\n  model: a\n"
# (spec body below `model: a`, whether the CRD says the CLI's message word for word)
BAD: list[tuple[str, bool]] = [
    ("  routes: [{to: [{model: b, wieght: 10}]}]\n", False),  # unknown field (a typo)
    ("  colour: blue\n", False),
    ("  routes: []\n", False),
    ("  routes: [{to: [{model: b, weight: 120}]}]\n", False),
    ("  routes: [{to: [{model: b, weight: -1}]}]\n", False),
    ("  routes: [{to: [{model: b, weight: 7.5}]}]\n", False),
    ("  routes: [{match: {headers: {x-a: {}}}, to: [{model: b}]}]\n", False),
    ("  routes: [{match: {headers: {x-a: {exact: v, prefix: p}}}, to: [{model: b}]}]\n", False),
    ("  mirror: {model: b, percent: 0}\n", False),
    ("  mirror: {model: b}\n", False),
    ("  canary: {model: b, steps: [{weight: 10, hold: 5 minutes}]}\n", False),
    ("  canary: {model: b, steps: []}\n", False),
    ("  canary: {model: b, steps: [{weight: 10}], abort: {errorRatePercent: 101}}\n", False),
    # parse_rule's own checks, which the CRD says in CEL
    ("  routes: [{to: [{model: b}]}]\n  canary: {model: c, steps: [{weight: 10}]}\n", True),
    ("  mirror: {model: a, percent: 10}\n", True),
    ("  canary: {model: a, steps: [{weight: 10}]}\n", True),
    ("  routes: [{to: [{model: b}]}, {match: {headers: {x-a: {exact: v}}}, to: [{model: c}]}]\n", True),
    ("  routes: [{to: [{model: b, weight: 50}]}]\n", True),
    ("  routes: [{to: [{model: b, weight: 50}, {model: c}]}]\n", True),
    ("  routes: [{to: [{model: b, weight: 50}, {model: c, weight: 40}]}]\n", True),
    ("  routes: [{to: [{model: b, weight: 50}, {model: b, weight: 50}]}]\n", False),
    ("  routes: [{to: [{model: b}], sticky: {header: x-user}}]\n", True),
    ("  routes: [{to: [{model: b, weight: 50}, {model: c, weight: 50}], sticky: {header: X-User}}]\n", False),
    ("  routes: [{match: {headers: {x-a: {regex: 'a(?=b)'}}}, to: [{model: b}]}]\n", True),
    ("  canary: {model: b, steps: [{weight: 50}, {weight: 20}]}\n", False),
]


@pytest.mark.parametrize("body,same_message", BAD, ids=[b.strip()[:60] for b, _ in BAD])
def test_a_rule_the_cli_refuses_the_crd_refuses_at_the_same_field(body: str, same_message: bool) -> None:
    text = HEAD + body
    cli = cli_error(text)
    errs = crd_errors(yaml.safe_load(text))
    assert errs, f"the CRD accepts what the CLI refuses: {cli}"
    # The CRD names the same field, or (a CEL rule on a list or an object) the object that holds it.
    matching = [(p, m) for p, m in errs if cli.field == p or cli.field.startswith(p + ".")]
    assert matching, (cli.field, errs)
    if same_message:
        assert cli.message in [m for _, m in matching], (cli.message, matching)


def test_the_examples_pass_both() -> None:
    n = 0
    for f in sorted(EXAMPLES.glob("*.yaml")):
        for doc in load_documents(f):
            if schema.is_rule(doc):
                assert crd_errors(doc.data) == [], f
                n += 1
    assert n >= 4


def test_cel_rules_compile_and_name_real_fields() -> None:
    for path, rule, _msg, field_path in crd.RULES:
        _CEL.compile(rule)
        node = crd._walk(OPENAPI, path)
        if field_path:
            assert field_path.split(".")[1] in node["properties"], (path, field_path)


def test_kubectl_get_trafficrules_columns() -> None:
    """The printer columns read fields the controller writes (meshserve/k8s/rules.py status_of)."""
    from meshserve.k8s import rules as kr

    (doc,) = load_documents("r.yaml", HEAD + "  canary: {model: b, steps: [{weight: 10}, {weight: 50}]}\n")
    rule = schema.parse_rule(doc, KNOWN)
    status = kr.status_of(kr.RuleVerdict({**doc.data, "metadata": {"name": "r", "generation": 3}}, rule),
                          {"phase": "Paused", "step": 1, "reason": ""})
    obj = {**doc.data, "status": status}
    row = {}
    for c in crd.PRINTER_COLUMNS:
        cur: Any = obj
        for part in c["jsonPath"].strip(".").split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        row[c["name"]] = cur
    assert row == {"Model": "a", "Phase": "Paused", "Step": 2, "Canary": 50, "Message": "", "Age": None}
    assert status["steps"] == 2 and status["observedGeneration"] == 3
    for c in crd.PRINTER_COLUMNS:
        if c["jsonPath"].startswith(".status."):
            assert c["jsonPath"].split(".")[2] in crd.STATUS["properties"]
