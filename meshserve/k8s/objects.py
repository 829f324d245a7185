"""Pure translation between Kubernetes API objects and meshserve's registry.

An InferenceService from the API becomes a `Document` and goes through
`registry.parse_inference_service`, exactly as a mesh-config/ file does: one schema, one code
path after parsing. ServingRuntimes, the storage-config Secret and runtime pods only feed the
status decision. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from meshserve import registry
from meshserve.model import Copy, CopyState, ModelSpec, auto_selected
from meshserve.yamlfile import ConfigError, Document

KSERVE_GROUP = "serving.kserve.io"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
RUNTIME_VERSION = "v1alpha1"
RUNTIME_PLURAL = "servingruntimes"
# ModelMesh's original CRD (apis/serving/v1alpha1/predictor_types.go in modelmesh-serving).
PREDICTOR_VERSION = "v1alpha1"
PREDICTOR_PLURAL = "predictors"
CONFIG_MAP = "model-serving-config"
STORAGE_SECRET = "storage-config"
RUNTIME_POD_SELECTOR = "app.kubernetes.io/part-of=meshserve,app.kubernetes.io/component=runtime"
# A runtime pool's StatefulSet carries the runtime pods' labels too, plus the ServingRuntime it
# runs (KServe's own label), which is how the controller finds the workload to scale.
RUNTIME_POOL_SELECTOR = RUNTIME_POD_SELECTOR
RUNTIME_LABEL = "serving.kserve.io/servingRuntime"
# The Service users address, as in ModelMesh: grpc://modelmesh-serving.<namespace>:8033.
SERVICE_NAME = "modelmesh-serving"

# ModelMesh's failure reasons (the enum of KServe's lastFailureInfo.reason), so existing
# dashboards and scripts keep working.
REASON_INVALID_SPEC = "InvalidPredictorSpec"
REASON_NO_RUNTIME = "NoSupportingRuntime"
REASON_RUNTIME_UNKNOWN = "RuntimeNotRecognized"
REASON_RUNTIME_DISABLED = "RuntimeDisabled"
REASON_LOAD_FAILED = "ModelLoadFailed"
REASON_STORAGE = REASON_INVALID_SPEC  # a storage key missing from storage-config

Key = tuple[str, str]  # (namespace, name)


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def is_modelmesh(obj: dict[str, Any]) -> bool:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    return ann.get(registry.MODELMESH_ANNOTATION) == "ModelMesh"


def document_of(obj: dict[str, Any]) -> Document:
    """An API object as the registry's input. The label stands where a file name would, so
    errors read `k8s:InferenceService/ns/name: spec.predictor...: required`."""
    ns, name = key_of(obj)
    return Document(f"k8s:{obj.get('kind', 'InferenceService')}/{ns}/{name}", obj, None)


def parse_isvc(obj: dict[str, Any]) -> ModelSpec:
    """An InferenceService or a Predictor (by its kind). Raises ConfigError for a spec the
    registry refuses."""
    return registry.parse_model(document_of(obj))


def is_predictor(obj: dict[str, Any]) -> bool:
    return obj.get("kind") == registry.PREDICTOR_KIND


def _fields(obj: dict[str, Any]) -> tuple[str, str]:
    """Where a user fixes the runtime and the storage key, in this object's kind."""
    if is_predictor(obj):
        return "spec.runtime.name", "spec.storage.s3.secretKey"
    return "spec.predictor.model.runtime", "spec.predictor.model.storage.key (or the serving.kserve.io/secretKey annotation)"


@dataclass(frozen=True)
class Runtime:
    name: str
    formats: frozenset[str]  # formats it can serve when named explicitly
    auto_formats: frozenset[str]  # formats it is picked for without `runtime:` (autoSelect)
    disabled: bool = False
    server_type: str = ""  # builtInAdapter.serverType (triton, mlserver, ...), "" for others


def parse_runtime(obj: dict[str, Any]) -> Runtime:
    spec = obj.get("spec") or {}
    formats, auto = set(), set()
    for f in spec.get("supportedModelFormats") or []:
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            formats.add(f["name"])
            # KServe's default for autoSelect is false, but a runtime that lists formats
            # without the field is the users' common form (fixtures/servingruntime-triton.yaml).
            if f.get("autoSelect", True):
                auto.add(f["name"])
    adapter = spec.get("builtInAdapter")
    server_type = str(adapter.get("serverType") or "") if isinstance(adapter, dict) else ""
    return Runtime(key_of(obj)[1], frozenset(formats), frozenset(auto), bool(spec.get("disabled", False)), server_type)


def allow_server_types(runtimes: dict[str, Runtime], allowed: frozenset[str] | None) -> dict[str, Runtime]:
    """model-serving-config's builtInServerTypes: a runtime whose built-in adapter names a
    server type not in the list is disabled, as ModelMesh disables it. None: all allowed."""
    if allowed is None:
        return runtimes
    return {n: (r if not r.server_type or r.server_type in allowed else dataclasses.replace(r, disabled=True))
            for n, r in runtimes.items()}


def runtime_of(spec: ModelSpec, runtimes: dict[str, Runtime]) -> str | None:
    """The ServingRuntime that serves `spec`: the one it names, else the first by name of the
    enabled runtimes that auto-select its format (KServe's rule; loader/meshserve_loader/
    serving_runtime.py `select_runtime` is the same rule over parsed YAML). None when none does."""
    if spec.runtime:
        r = runtimes.get(spec.runtime)
        return spec.runtime if r is not None and not r.disabled else None
    return auto_selected(spec.format, {n: r.auto_formats for n, r in runtimes.items() if not r.disabled})


@dataclass(frozen=True)
class Pool:
    """A runtime pool's workload: the StatefulSet whose pods run one ServingRuntime."""

    workload: str
    runtime: str
    replicas: int


def parse_pool(obj: dict[str, Any]) -> Pool | None:
    """A StatefulSet labelled with the ServingRuntime it runs, else None."""
    meta = obj.get("metadata") or {}
    runtime = (meta.get("labels") or {}).get(RUNTIME_LABEL)
    if not runtime or not meta.get("name"):
        return None
    replicas = (obj.get("spec") or {}).get("replicas")
    return Pool(str(meta["name"]), str(runtime), 1 if replicas is None else int(replicas))  # unset means 1


def parse_storage_keys(secret: dict[str, Any] | None) -> dict[str, str]:
    """storage-config Secret -> {key: store type}. Only the types are kept: credentials stay in
    the Secret, which the loader sidecar mounts itself, and never enter Redis. Entries that are
    not ModelMesh's JSON form (e.g. bare `aws_access_key_id`) map to type ''."""
    if not secret:
        return {}
    out: dict[str, str] = {}
    raw: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            raw[k] = base64.b64decode(v).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raw[k] = ""
    raw.update(secret.get("stringData") or {})
    for k, v in raw.items():
        try:
            entry = json.loads(v)
        except (TypeError, ValueError):
            entry = None
        out[k] = str(entry.get("type", "")) if isinstance(entry, dict) else ""
    return out


@dataclass(frozen=True)
class RuntimePod:
    name: str
    ip: str
    ready: bool
    gone: bool  # terminating, failed or finished: its routes should go now, not after heartbeats


def parse_pod(obj: dict[str, Any]) -> RuntimePod:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    gone = bool(meta.get("deletionTimestamp")) or status.get("phase") in ("Failed", "Succeeded")
    return RuntimePod(str(meta.get("name") or ""), str(status.get("podIP") or ""), ready and not gone, gone)


@dataclass
class Verdict:
    """What the controller decided for one InferenceService."""

    spec: ModelSpec | None
    ready: bool
    reason: str = ""
    message: str = ""
    conflict: bool = False  # refused because another kind's object has its name


def judge(
    obj: dict[str, Any],
    runtimes: dict[str, Runtime],
    storage_keys: dict[str, str],
) -> Verdict:
    """Parse one InferenceService or Predictor and check it against the runtimes and storage it names."""
    try:
        spec = parse_isvc(obj)
    except ConfigError as e:
        return Verdict(None, False, REASON_INVALID_SPEC, str(e))
    runtime_field, key_field = _fields(obj)
    live = {n: r for n, r in runtimes.items() if not r.disabled}
    if spec.runtime:
        r = live.get(spec.runtime)
        if spec.runtime in runtimes and r is None:
            return Verdict(spec, False, REASON_RUNTIME_DISABLED, f"ServingRuntime {spec.runtime!r} is disabled: enable it or name another in {runtime_field}")
        if r is None:
            return Verdict(spec, False, REASON_RUNTIME_UNKNOWN, f"ServingRuntime {spec.runtime!r} not found in namespace {spec.namespace}: create it or fix {runtime_field}")
        if spec.format not in r.formats:
            return Verdict(spec, False, REASON_NO_RUNTIME, f"ServingRuntime {spec.runtime!r} does not list model format {spec.format!r} in supportedModelFormats")
    elif not any(spec.format in r.auto_formats for r in live.values()):
        return Verdict(spec, False, REASON_NO_RUNTIME, f"no ServingRuntime with autoSelect supports model format {spec.format!r}: add one or name it in {runtime_field}")
    key = spec.storage.get("key")
    if key and key not in storage_keys:
        return Verdict(spec, False, REASON_STORAGE, f"storage key {key!r} is not in Secret {STORAGE_SECRET!r}: add it there or fix {key_field}")
    return Verdict(spec, True)


def name_taken(obj: dict[str, Any]) -> Verdict:
    """A Predictor whose name an InferenceService already uses: one alias cannot be both.
    ModelMesh refuses the second source with this reason and message."""
    try:
        spec: ModelSpec | None = parse_isvc(obj)
    except ConfigError:
        spec = None
    return Verdict(spec, False, REASON_INVALID_SPEC, "Predictor already exists with the same name from a different source "
                   "(an InferenceService): rename one of them", conflict=True)


def _state_of(copies: dict[str, Copy]) -> str:
    if any(c.state == CopyState.LOADED for c in copies.values()):
        return "Loaded"
    if any(c.state == CopyState.LOADING for c in copies.values()):
        return "Loading"
    return "Standby"


def isvc_status(
    v: Verdict,
    namespace: str,
    copies: dict[str, Copy],
    now: str,
    previous: dict[str, Any] | None = None,
    serving: dict[str, Copy] | None = None,
) -> dict[str, Any]:
    """The InferenceService `status` in KServe's v1beta1 form, with ModelMesh's meanings.

    - A registered model is Ready even when no pod holds it yet: the first request loads it
      (activeModelState Standby).
    - A bad update while an earlier version still serves (`serving`: that version's copies)
      stays Ready on the earlier version, with targetModelState FailedToLoad and
      transitionStatus BlockedByFailedLoad (InvalidSpec for a spec that doesn't parse), and
      the reason in lastFailureInfo.
    - `now` is used only when the Ready condition changes, so an unchanged verdict yields an
      unchanged status and no write."""
    url = f"grpc://{SERVICE_NAME}.{namespace}:8033"
    status: dict[str, Any] = {"url": url, "address": {"url": url}}
    if v.ready:
        shown = copies
        transition, active, target = "UpToDate", _state_of(copies), ""
    else:
        shown = serving or {}
        transition = "InvalidSpec" if v.spec is None else "BlockedByFailedLoad"
        active = _state_of(shown) if serving is not None else "FailedToLoad"
        target = "FailedToLoad" if serving is not None else ""
    loaded = sum(1 for c in shown.values() if c.state == CopyState.LOADED)
    failed = [c for c in copies.values() if c.state == CopyState.FAILED]
    model_status: dict[str, Any] = {
        "transitionStatus": transition,
        "states": {"activeModelState": active, "targetModelState": target},
        "copies": {"totalCopies": loaded, "failedCopies": len(failed)},
    }
    reason, message = v.reason, v.message
    if v.ready and failed and not loaded:
        reason, message = REASON_LOAD_FAILED, failed[0].reason or "load failed"
    if reason:
        failure: dict[str, Any] = {"reason": reason, "message": message}
        if v.spec is not None:
            failure["modelRevisionName"] = v.spec.id
        model_status["lastFailureInfo"] = failure
    status["modelStatus"] = model_status
    # Where to call it, as ModelMesh writes it: the one Service every model is served behind.
    status["components"] = {"predictor": {"url": url, "grpcUrl": url, "restUrl": f"http://{SERVICE_NAME}.{namespace}:8008"}}
    ready = v.ready or serving is not None
    # PredictorReady, then Ready (knative keeps conditions sorted by type), both from the one
    # verdict, as ModelMesh derives both from the Predictor's `available`.
    status["conditions"] = [_condition(t, ready, v, previous, now) for t in ("PredictorReady", "Ready")]
    return status


def _condition(typ: str, ready: bool, v: Verdict, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": typ, "status": "True" if ready else "False"}
    if not v.ready:
        cond.update(reason=v.reason, message=v.message)
    old = next((c for c in (previous or {}).get("conditions") or [] if c.get("type") == typ), None)
    same = old is not None and all(old.get(k) == cond.get(k) for k in ("status", "reason", "message"))
    cond["lastTransitionTime"] = old.get("lastTransitionTime", now) if same and old else now
    return cond


def predictor_status(
    v: Verdict,
    namespace: str,
    copies: dict[str, Copy],
    now: str,
    previous: dict[str, Any] | None = None,
    serving: dict[str, Copy] | None = None,
) -> dict[str, Any]:
    """A Predictor's `status` in ModelMesh's PredictorStatus form (predictor_types.go):
    available, transitionStatus, activeModelState, targetModelState, lastFailureInfo,
    httpEndpoint, grpcEndpoint, totalCopies, failedCopies. Same meanings as `isvc_status`
    (which derives the InferenceService form from the same verdict): a registered model is
    available in Standby; a bad update keeps the earlier version available with
    BlockedByFailedLoad / InvalidSpec. `now` is written only when the failure changes."""
    inner = isvc_status(v, namespace, copies, now, None, serving)
    ms = inner["modelStatus"]
    status: dict[str, Any] = {
        "available": v.ready or serving is not None,
        "transitionStatus": ms["transitionStatus"],
        "activeModelState": ms["states"]["activeModelState"],
        "targetModelState": ms["states"]["targetModelState"],
        # ModelMesh's endpoints: the one Service every model is served behind.
        "grpcEndpoint": f"grpc://{SERVICE_NAME}.{namespace}:8033",
        "httpEndpoint": f"http://{SERVICE_NAME}.{namespace}:8008",
        "totalCopies": ms["copies"]["totalCopies"],
        "failedCopies": ms["copies"]["failedCopies"],
    }
    failure = ms.get("lastFailureInfo")
    if failure:
        info: dict[str, Any] = {"reason": failure["reason"], "message": failure["message"]}
        if failure.get("modelRevisionName"):
            info["modelId"] = failure["modelRevisionName"]
        old = (previous or {}).get("lastFailureInfo") or {}
        same = all(old.get(k) == info.get(k) for k in ("reason", "message", "modelId"))
        info["time"] = old.get("time", now) if same else now
        status["lastFailureInfo"] = info
    return status


PREDICTOR_STATUS_FIELDS = ("available", "transitionStatus", "activeModelState", "targetModelState", "lastFailureInfo",
                           "httpEndpoint", "grpcEndpoint", "totalCopies", "failedCopies")


def merge_patch(current: Any, desired: Any) -> Any:
    """The RFC 7386 merge patch that turns `current` into `desired` ({} when equal). Keys we
    no longer want are sent as null: a merge patch that merely omits them would keep them,
    and the controller would patch the same status forever."""
    if not isinstance(current, dict) or not isinstance(desired, dict):
        return desired if current != desired else {}
    out: dict[str, Any] = {k: None for k in current if k not in desired}
    for k, v in desired.items():
        if k not in current:
            out[k] = v
        elif current[k] != v:
            sub = merge_patch(current[k], v)
            out[k] = sub if isinstance(v, dict) and isinstance(current[k], dict) else v
    return out


def status_patch(current: dict[str, Any] | None, desired: dict[str, Any], owned: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The patch for the fields the controller owns (other writers' status fields are left)."""
    cur = {k: v for k, v in (current or {}).items() if k in (owned or OWNED_STATUS_FIELDS)}
    return merge_patch(cur, desired)


OWNED_STATUS_FIELDS = ("url", "address", "components", "modelStatus", "conditions")


@dataclass
class Plan:
    """Registry writes that bring Redis to what the cluster says."""

    register: list[ModelSpec] = field(default_factory=list)
    remove_aliases: list[str] = field(default_factory=list)


def diff_registrations(desired: dict[str, ModelSpec], registered: dict[str, ModelSpec]) -> Plan:
    """`desired`: alias -> spec from the cluster; `registered`: alias -> the spec its alias
    points at in Redis (only aliases of this controller's namespace). Registers new or changed
    specs (annotations such as minCopies change the spec, not the id) and removes the rest."""
    p = Plan()
    for alias, spec in sorted(desired.items()):
        if registered.get(alias) != spec:
            p.register.append(spec)
    p.remove_aliases = sorted(a for a in registered if a not in desired)
    return p
