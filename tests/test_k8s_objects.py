"""Pure translation of Kubernetes objects (meshserve.k8s.objects) and the relist diff. Kind: unit."""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from pathlib import Path

import pytest
import yaml

from meshserve.apply import read_models
from meshserve.k8s import objects as ob
from meshserve_controller.watch import ADDED, DELETED, MODIFIED, diff_list
from meshserve.model import Copy, CopyState

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MNIST = yaml.safe_load((REPO / "mesh-config" / "sklearn-mnist.yaml").read_text())
RUNTIMES = {"builtin": ob.Runtime("builtin", frozenset({"sklearn"}), frozenset({"sklearn"}))}


def test_api_object_parses_to_the_file_spec() -> None:
    """One code path: the API object and the mesh-config/ file give the same ModelSpec."""
    obj = json.loads(json.dumps(MNIST))
    obj["metadata"].update(resourceVersion="42", uid="u", managedFields=[{}])
    obj["status"] = {"url": "x"}
    (from_file,) = read_models(REPO / "mesh-config")
    assert ob.parse_isvc(obj) == from_file


def test_judge_reasons() -> None:
    v = ob.judge(MNIST, RUNTIMES, {})
    assert v.ready and v.spec is not None
    assert ob.judge(MNIST, {}, {}).reason == ob.REASON_NO_RUNTIME
    named = json.loads(json.dumps(MNIST))
    named["spec"]["predictor"]["model"]["runtime"] = "triton"
    v = ob.judge(named, RUNTIMES, {})
    assert v.reason == ob.REASON_RUNTIME_UNKNOWN and "triton" in v.message
    off = {"triton": ob.Runtime("triton", frozenset({"sklearn"}), frozenset(), disabled=True)}
    assert ob.judge(named, off, {}).reason == ob.REASON_RUNTIME_DISABLED
    keyed = json.loads(json.dumps(MNIST))
    keyed["spec"]["predictor"]["model"]["storage"] = {"key": "localMinIO", "path": "m"}
    assert ob.judge(keyed, RUNTIMES, {}).reason == ob.REASON_STORAGE
    assert ob.judge(keyed, RUNTIMES, {"localMinIO": "s3"}).ready
    bad = json.loads(json.dumps(MNIST))
    bad["apiVersion"] = "serving.kserve.io/v1alpha1"
    v = ob.judge(bad, RUNTIMES, {})
    assert (v.ready, v.reason, v.spec) == (False, ob.REASON_INVALID_SPEC, None)
    assert "k8s:InferenceService/modelmesh-serving/sklearn-mnist" in v.message


def test_storage_keys_keep_types_not_credentials() -> None:
    secret = {"data": {"s3": base64.b64encode(b'{"type": "s3", "secret_access_key": "SECRET"}').decode()},
              "stringData": {"aws_access_key_id": "YOUR_ACCESS_KEY"}}
    keys = ob.parse_storage_keys(secret)
    assert keys == {"s3": "s3", "aws_access_key_id": ""}
    assert "SECRET" not in json.dumps(keys)


def test_runtime_and_pod_parsing() -> None:
    r = ob.parse_runtime(yaml.safe_load("""
metadata: {name: r}
spec: {supportedModelFormats: [{name: a, autoSelect: false}, {name: b}], disabled: true}"""))
    assert (r.formats, r.auto_formats, r.disabled) == ({"a", "b"}, {"b"}, True)
    p = ob.parse_pod({"metadata": {"name": "p", "deletionTimestamp": "t"},
                      "status": {"podIP": "1.2.3.4", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert (p.ip, p.ready, p.gone) == ("1.2.3.4", False, True)


def cond(status: dict, typ: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == typ)


def test_status_is_stable_and_says_why() -> None:
    v = ob.judge(MNIST, RUNTIMES, {})
    s1 = ob.isvc_status(v, "ns", {}, "2026-01-01T00:00:00Z")
    assert s1["url"] == "grpc://modelmesh-serving.ns:8033"
    assert cond(s1, "Ready")["status"] == "True"
    # Same verdict later: same status, so no write (the transition time is kept).
    assert ob.status_patch(s1, ob.isvc_status(v, "ns", {}, "2026-02-02T00:00:00Z", s1)) == {}
    failed = ob.isvc_status(v, "ns", {"pod-0": Copy(CopyState.FAILED, reason="OOM")}, "t", s1)
    assert failed["modelStatus"]["lastFailureInfo"]["reason"] == ob.REASON_LOAD_FAILED
    loaded = ob.isvc_status(v, "ns", {"pod-0": Copy(CopyState.LOADED)}, "t", s1)
    assert loaded["modelStatus"]["states"]["activeModelState"] == "Loaded"
    # Recovery clears the failure: the patch nulls the key (merge patch keeps omitted keys).
    assert ob.status_patch(failed, s1)["modelStatus"]["lastFailureInfo"] is None
    bad = ob.isvc_status(ob.judge(MNIST, {}, {}), "ns", {}, "t3", s1)
    assert cond(bad, "Ready")["lastTransitionTime"] == "t3"
    assert cond(bad, "Ready")["reason"] == ob.REASON_NO_RUNTIME
    assert bad["modelStatus"]["states"] == {"activeModelState": "FailedToLoad", "targetModelState": ""}
    # A bad update while the earlier version serves: still Ready, on the earlier version.
    kept = ob.isvc_status(ob.judge(MNIST, {}, {}), "ns", {}, "t4", s1, serving={"pod-0": Copy(CopyState.LOADED)})
    assert cond(kept, "Ready")["status"] == "True" and cond(kept, "Ready")["reason"] == ob.REASON_NO_RUNTIME
    assert kept["modelStatus"]["states"] == {"activeModelState": "Loaded", "targetModelState": "FailedToLoad"}
    assert kept["modelStatus"]["transitionStatus"] == "BlockedByFailedLoad"


@pytest.mark.skipif(not (SHARED / "schemas").exists(), reason="needs ../shared/schemas (the KServe CRD schemas)")
def test_status_matches_the_kserve_crd_schema() -> None:
    """What the controller writes is valid InferenceService status per KServe's CRD."""
    import jsonschema

    crd = yaml.load((SHARED / "schemas" / "kserve-inferenceservices-crd.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    # The status subtree only, and the C YAML parser: the 2 MB CRD is slow to read and check otherwise.
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]["properties"]["status"]
    v = ob.judge(MNIST, RUNTIMES, {})
    keyed = json.loads(json.dumps(MNIST))
    keyed["spec"]["predictor"]["model"]["storage"] = {"key": "nope", "path": "m"}
    invalid = json.loads(json.dumps(MNIST))
    invalid["spec"]["predictor"]["model"].pop("modelFormat")
    named = json.loads(json.dumps(MNIST))
    named["spec"]["predictor"]["model"]["runtime"] = "nope"
    statuses = [ob.isvc_status(v, "ns", {}, "t"),
                ob.isvc_status(v, "ns", {"p": Copy(CopyState.FAILED, reason="x")}, "t"),
                ob.isvc_status(v, "ns", {"p": Copy(CopyState.LOADING)}, "t")]
    for bad in (ob.judge(MNIST, {}, {}), ob.judge(keyed, RUNTIMES, {}), ob.judge(invalid, RUNTIMES, {}), ob.judge(named, RUNTIMES, {})):
        statuses += [ob.isvc_status(bad, "ns", {}, "t"), ob.isvc_status(bad, "ns", {}, "t", serving={"p": Copy(CopyState.LOADED)})]
    validator = jsonschema.Draft7Validator(schema)
    for s in statuses:
        validator.validate(s)


def test_status_has_modelmesh_components_and_conditions() -> None:
    """As ModelMesh writes an InferenceService's status: the predictor component's URLs, and
    PredictorReady beside Ready, both following the verdict."""
    ok = ob.isvc_status(ob.judge(MNIST, RUNTIMES, {}), "ns", {"p": Copy(CopyState.LOADED)}, "t")
    assert ok["components"] == {"predictor": {"url": "grpc://modelmesh-serving.ns:8033", "grpcUrl": "grpc://modelmesh-serving.ns:8033",
                                              "restUrl": "http://modelmesh-serving.ns:8008"}}
    assert [(c["type"], c["status"]) for c in ok["conditions"]] == [("PredictorReady", "True"), ("Ready", "True")]
    assert ok["modelStatus"] == {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded", "targetModelState": ""},
                                 "copies": {"totalCopies": 1, "failedCopies": 0}}
    bad = ob.isvc_status(ob.judge(MNIST, {}, {}), "ns", {}, "t2", ok)
    for c in bad["conditions"]:
        assert (c["status"], c["reason"], c["lastTransitionTime"]) == ("False", ob.REASON_NO_RUNTIME, "t2")
    assert bad["modelStatus"]["lastFailureInfo"]["reason"] == ob.REASON_NO_RUNTIME and bad["modelStatus"]["lastFailureInfo"]["message"]
    # An older status written before components existed gets them in the next patch.
    old = {k: v for k, v in ok.items() if k != "components"}
    assert ob.status_patch(old, ok) == {"components": ok["components"]}


def _jsonpath(obj: Any, path: str) -> list[Any]:
    """The subset of kubectl's JSONPath that CRD printer columns use: .a.b and [?(@.k==v)]."""
    cur = [obj]
    for part in re.findall(r"\.[A-Za-z]+|\[\?\(@\.[A-Za-z]+==[^)]*\)\]", path):
        if part.startswith("."):
            cur = [c.get(part[1:]) for c in cur if isinstance(c, dict) and part[1:] in c]
            continue
        k, want = re.match(r"\[\?\(@\.([A-Za-z]+)==(.*)\)\]", part).groups()
        val = json.loads(want.replace("'", '"'))
        cur = [x for c in cur if isinstance(c, list) for x in c if isinstance(x, dict) and x.get(k) == val]
    return cur


@pytest.mark.skipif(not (SHARED / "schemas").exists(), reason="needs ../shared/schemas (the KServe CRD schemas)")
def test_kubectl_get_isvc_shows_modelmesh_columns() -> None:
    """`kubectl get isvc` through KServe's printer columns: under ModelMesh it shows URL
    grpc://modelmesh-serving.<ns>:8033, READY True, and empty traffic columns."""
    crd = yaml.load((SHARED / "schemas" / "kserve-inferenceservices-crd.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    cols = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["additionalPrinterColumns"]
    obj = {**MNIST, "status": ob.isvc_status(ob.judge(MNIST, RUNTIMES, {}), "modelmesh-serving", {}, "t")}
    row = {c["name"]: ",".join(map(str, _jsonpath(obj, c["jsonPath"]))) for c in cols if c["name"] != "Age"}
    assert row == {"URL": "grpc://modelmesh-serving.modelmesh-serving:8033", "Ready": "True", "Prev": "", "Latest": "",
                   "PrevRolledoutRevision": "", "LatestReadyRevision": ""}
    down = {**MNIST, "status": ob.isvc_status(ob.judge(MNIST, {}, {}), "modelmesh-serving", {}, "t")}
    assert _jsonpath(down, ".status.conditions[?(@.type=='Ready')].status") == ["False"]


def test_plan_registers_changes_and_removes_the_rest() -> None:
    (spec,) = read_models(REPO / "mesh-config")
    assert ob.diff_registrations({spec.alias: spec}, {spec.alias: spec}).register == []
    changed = type(spec)(**{**spec.__dict__, "min_copies": 2})
    p = ob.diff_registrations({spec.alias: changed}, {spec.alias: spec, "gone": spec})
    assert p.register == [changed] and p.remove_aliases == ["gone"]


def test_relist_diff() -> None:
    def o(name: str, rv: str) -> dict:
        return {"metadata": {"namespace": "n", "name": name, "resourceVersion": rv}}

    cache = {("n", "a"): o("a", "1"), ("n", "b"): o("b", "2"), ("n", "c"): o("c", "3")}
    evs = diff_list(cache, [o("b", "2"), o("c", "9"), o("d", "10")], "x")
    assert [(e.type, e.obj["metadata"]["name"]) for e in evs] == [(DELETED, "a"), (MODIFIED, "c"), (ADDED, "d")]


def test_pool_pressure_counts_booked_bytes_per_runtime() -> None:
    from meshserve_controller.pressure import pool_pressure
    from meshserve.model import Pod

    pods = {"a": Pod("a", "h", 1, 2, 100, runtime="builtin"), "b": Pod("b", "h", 1, 2, 100, runtime="builtin"),
            "m": Pod("m", "h", 1, 2, 50, runtime="mlserver")}
    placements = {
        "x": {"a": Copy(CopyState.LOADED, 40), "m": Copy(CopyState.LOADING, 25)},
        "y": {"b": Copy(CopyState.UNLOADING, 30), "gone": Copy(CopyState.LOADED, 99)},
        "z": {"a": Copy(CopyState.FAILED, 10), "b": Copy(CopyState.LOADED, 40)},
    }
    p = pool_pressure(pods, placements)
    assert (p["builtin"].pods, p["builtin"].used_bytes, p["builtin"].capacity_bytes) == (2, 80, 200)
    assert p["builtin"].ratio == 0.4 and p["mlserver"].ratio == 0.5
    assert pool_pressure({}, placements) == {}
