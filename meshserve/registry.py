"""The model registry's input side: InferenceService resources (KServe v1beta1, ModelMesh mode)
and ModelMesh's own Predictor resources (serving.kserve.io/v1alpha1) turned into ModelSpecs.
Pure: the same code parses mesh-config/ files and objects from the Kubernetes API, so both
modes share one schema and one code path after parsing.

ModelMesh's rules, followed here (kserve/modelmesh-serving, pkg/predictor_source/
inferenceservice_registry.go and apis/serving/v1alpha1/predictor_types.go):
- an InferenceService's predictor is `spec.predictor.model` or the legacy
  `spec.predictor.<framework>` (sklearn, xgboost, ...), whose framework is the model format;
- with `storageUri`, the annotations `serving.kserve.io/secretKey` and
  `serving.kserve.io/schemaPath` give the storage-config key and the schema file;
  `storage.key` wins over the annotation;
- a Predictor names its format in `spec.modelType`, its files in `spec.path` (or
  `spec.storage.path`) and its store in `spec.storage.s3.secretKey` (or `spec.storage.key`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import jsonschema

from meshserve.model import ModelSpec
from meshserve.yamlfile import ConfigError, Document

ISVC_API = "serving.kserve.io/v1beta1"
ISVC_KIND = "InferenceService"
PREDICTOR_API = "serving.kserve.io/v1alpha1"
PREDICTOR_KIND = "Predictor"
MODEL_KINDS = {ISVC_KIND: ISVC_API, PREDICTOR_KIND: PREDICTOR_API}
MODELMESH_ANNOTATION = "serving.kserve.io/deploymentMode"
SECRET_KEY_ANNOTATION = "serving.kserve.io/secretKey"
SCHEMA_PATH_ANNOTATION = "serving.kserve.io/schemaPath"
MESHSERVE_ANNOTATION_PREFIX = "meshserve.io/"
# The memory one copy of the model takes, a Kubernetes quantity ("512Mi", "1G"): placement books
# it before the first load, and the loader never reports less (docs/design/placement.md).
MEMORY_ANNOTATION = MESHSERVE_ANNOTATION_PREFIX + "memory"
# The registered model (InferenceService name) this one is an adapter of (issue 17).
BASE_ANNOTATION = MESHSERVE_ANNOTATION_PREFIX + "base-model"
# PEFT's file in an adapter's folder, whose `base_model_name_or_path` names the base too.
ADAPTER_CONFIG = "adapter_config.json"
# ModelMesh's source ids in concrete model names (controllers/predictor_controller.go):
# `<name>__isvc-<hash>` for an InferenceService, `<name>__ksp-<hash>` for a Predictor.
ISVC_SOURCE, PREDICTOR_SOURCE = "isvc", "ksp"
# KServe v1beta1's framework fields of `spec.predictor` (the legacy form, before `model`):
# the field's name is the model format. From the InferenceService CRD's predictor properties.
LEGACY_FRAMEWORKS = ("sklearn", "xgboost", "lightgbm", "onnx", "tensorflow", "pytorch", "triton", "pmml", "paddle", "huggingface")

# The Predictor fields meshserve reads, with ModelMesh's types (its CRD,
# config/crd/bases/serving.kserve.io_predictors.yaml); tests check the two agree on the
# examples. Fields of the CRD that meshserve does not use (gpu, serviceAccountName,
# protocolVersion) are allowed and ignored, as ModelMesh ignores serviceAccountName.
_STR = {"type": "string"}
PREDICTOR_SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["modelType"],
    "properties": {
        "modelType": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}, "version": _STR}},
        "runtime": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
        "path": _STR,
        "schemaPath": _STR,
        "gpu": {"enum": ["required", "preferred"]},
        "serviceAccountName": _STR,
        "protocolVersion": _STR,
        "storage": {
            "type": "object",
            "properties": {
                "key": _STR,
                "path": _STR,
                "schemaPath": _STR,
                "parameters": {"type": "object", "additionalProperties": _STR},
                "s3": {"type": "object", "required": ["secretKey"], "properties": {"secretKey": {"type": "string", "minLength": 1}, "bucket": _STR}},
                "persistentVolumeClaim": {"type": "object", "required": ["claimName"],
                                          "properties": {"claimName": {"type": "string", "minLength": 1}, "readOnly": {"type": "boolean"}}},
            },
        },
    },
}
_PREDICTOR_VALIDATOR = jsonschema.Draft202012Validator(PREDICTOR_SPEC_SCHEMA)


def concrete_model_id(name: str, predictor: dict[str, Any], source: str = ISVC_SOURCE) -> str:
    """ModelMesh's naming: the alias, the source (isvc or ksp) and the first 10 hex of SHA-1
    of the predictor spec JSON.

    A spec change yields a new concrete model, which is how version moves work."""
    canonical = json.dumps(predictor, sort_keys=True, separators=(",", ":"))
    return f"{name}__{source}-{hashlib.sha1(canonical.encode()).hexdigest()[:10]}"


def _name(doc: Document, kind: str) -> tuple[dict[str, Any], str]:
    """metadata and metadata.name, checked: the name is the alias users address."""
    d = doc.data
    meta = d.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise doc.error(("metadata", "name"), f"required: the {kind} name")
    name = meta["name"]
    if "__" in name or "/" in name:
        raise doc.error(("metadata", "name"), "must not contain '__' or '/'")
    return meta, name


def _copies(doc: Document, meta: dict[str, Any]) -> dict[str, Any]:
    """meshserve's own annotations (minCopies, maxCopies, pinned, memory), the same on every kind."""
    ann = meta.get("annotations") or {}

    def ann_int(key: str, default: int) -> int:
        raw = ann.get(MESHSERVE_ANNOTATION_PREFIX + key)
        if raw is None:
            return default
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise doc.error(("metadata", "annotations", MESHSERVE_ANNOTATION_PREFIX + key), "must be an integer") from None

    return {
        "min_copies": ann_int("minCopies", 0),
        "max_copies": ann_int("maxCopies", 0),
        "pinned": str(ann.get(MESHSERVE_ANNOTATION_PREFIX + "pinned", "false")).lower() == "true",
        "size_hint": _memory(doc, ann),
        "base": _base(doc, meta, ann),
    }


def _base(doc: Document, meta: dict[str, Any], ann: dict[str, Any]) -> str:
    """`meshserve.io/base-model`: the name of the registered model this one adapts ("": none).
    A plain model name, as users address it (not a path, not the model itself)."""
    raw = ann.get(BASE_ANNOTATION)
    if raw is None:
        return ""
    where = ("metadata", "annotations", BASE_ANNOTATION)
    if not isinstance(raw, str) or not raw.strip():
        raise doc.error(where, f"must be the name of the base model's InferenceService, got {raw!r}")
    name = raw.strip()
    if "__" in name or "/" in name:
        raise doc.error(where, f"{name!r}: name the base's InferenceService (no '/' or '__'); a path or hub id is not a registered model")
    if name == meta.get("name"):
        raise doc.error(where, f"{name!r} is this model itself: a model cannot be its own base")
    return name


@dataclass(frozen=True)
class FromStorage:
    """What registration read from a model's files (meshserve_loader/predict.py), for its spec."""
    size: int = 0  # bytes predicted from the files (disk x 1.25); 0: not listed
    base: str = ""  # the base its PEFT adapter_config.json names; "": none, or not read
    base_file: str = ""  # where that adapter_config.json is, for the user to see


def base_from_adapter_config(text: str, file: str = ADAPTER_CONFIG, model: str = "") -> str:
    """The base PEFT's adapter_config.json names (`base_model_name_or_path`), as a registered
    model's name: the last path segment of a hub id or folder ("sentence-transformers/
    all-MiniLM-L6-v2" -> "all-MiniLM-L6-v2"), which is how a user names its InferenceService.
    ConfigError with file:line on a broken file, or one naming `model` itself (the adapter's own
    name, when known); "" when the file names no base."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", 0)
        raise ConfigError(file, line, "", f"not valid JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(file, 1, "", "expected a JSON object (PEFT's adapter config)")
    raw = doc.get("base_model_name_or_path")
    if raw is None or raw == "":
        return ""
    line = _json_line(text, "base_model_name_or_path")
    if not isinstance(raw, str):
        raise ConfigError(file, line, "base_model_name_or_path", f"must be a string, got {raw!r}")
    name = raw.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", "..") or "__" in name:
        raise ConfigError(file, line, "base_model_name_or_path", f"{raw!r} names no model; give the base's InferenceService name")
    if name == model:
        raise ConfigError(file, line, "base_model_name_or_path", f"{raw!r} is {model} itself: a model cannot be its own base")
    return name


def _json_line(text: str, key: str) -> int:
    i = text.find(f'"{key}"')
    return text.count("\n", 0, i) + 1 if i >= 0 else 0


def _memory(doc: Document, ann: dict[str, Any]) -> int:
    """`meshserve.io/memory` in bytes (0: not stated). Kubernetes quantity syntax, parsed by the
    official client's parser so "512Mi" means here what it means in a resources block.

    An annotation, not the predictor's `resources.requests.memory`: in ModelMesh mode that block
    sizes no container (every model shares its ServingRuntime's pods), and reading it as the
    model's size would silently change what existing manifests reserve."""
    raw = ann.get(MEMORY_ANNOTATION)
    if raw is None:
        return 0
    from meshserve.extras import needs

    with needs("control", f"the {MEMORY_ANNOTATION} annotation (a Kubernetes quantity)"):
        from kubernetes.utils.quantity import parse_quantity  # only when a size is stated: a 1 s import

    where = ("metadata", "annotations", MEMORY_ANNOTATION)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise doc.error(where, f"must be a memory quantity such as 512Mi or 2G, got {raw!r}")
    try:
        value = parse_quantity(raw)
    except ValueError:
        raise doc.error(where, f"{raw!r} is not a memory quantity; write e.g. 512Mi, 2Gi or 300M") from None
    if value <= 0:
        raise doc.error(where, f"{raw!r}: must be more than 0 bytes")
    # A fractional byte count ("1.5k" is exact, "0.1" is not) rounds up: a booking must cover it.
    return math.ceil(value)


def _predictor_model(doc: Document, predictor: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...], str | None]:
    """The model part of an InferenceService predictor: `model`, or the legacy
    `<framework>` field (ModelMesh's GetPredictorFramework), whose name is the format.
    Returns (the model mapping, its path in the document, the format the legacy field implies)."""
    model = predictor.get("model")
    if isinstance(model, dict):
        return model, ("spec", "predictor", "model"), None
    legacy = [f for f in LEGACY_FRAMEWORKS if isinstance(predictor.get(f), dict)]
    if len(legacy) > 1:
        raise doc.error(("spec", "predictor", legacy[1]), f"one framework per predictor: found {', '.join(legacy)}; keep one, or use spec.predictor.model")
    if legacy:
        return predictor[legacy[0]], ("spec", "predictor", legacy[0]), legacy[0]
    raise doc.error(("spec", "predictor", "model"),
                    f"required: spec.predictor.model (with modelFormat) or a framework field ({', '.join(LEGACY_FRAMEWORKS)})")


def _yaml_type(v: Any) -> str:
    return {dict: "mapping", list: "list", bool: "boolean", int: "number", float: "number"}.get(type(v), type(v).__name__)


def parse_inference_service(doc: Document) -> ModelSpec:
    d = doc.data
    if not isinstance(d, dict):
        raise doc.error((), "expected a mapping (an InferenceService resource)")
    if d.get("kind") != ISVC_KIND:
        raise doc.error(("kind",), f"expected {ISVC_KIND}, got {d.get('kind')!r}")
    meta, name = _name(doc, ISVC_KIND)
    spec = d.get("spec")
    predictor = spec.get("predictor") if isinstance(spec, dict) else None
    if not isinstance(predictor, dict):
        raise doc.error(("spec", "predictor"), "required")
    model, at, framework = _predictor_model(doc, predictor)
    if framework is not None:
        fmt_name, fmt_version = framework, str(model.get("runtimeVersion") or "")
    else:
        fmt = model.get("modelFormat")
        if not isinstance(fmt, dict) or fmt.get("name") in (None, ""):
            raise doc.error(at + ("modelFormat", "name"), "required, e.g. sklearn")
        if not isinstance(fmt["name"], str):
            raise doc.error(at + ("modelFormat", "name"), f"must be a string, e.g. sklearn; got a {_yaml_type(fmt['name'])}")
        fmt_name, fmt_version = fmt["name"], str(fmt.get("version") or "")
    raw_storage = model.get("storage") or {}
    if not isinstance(raw_storage, dict):
        raise doc.error(at + ("storage",), "must be a mapping (key, path, schemaPath, parameters)")
    storage = dict(raw_storage)
    ann = meta.get("annotations") or {}
    # The annotations that complete a storageUri, as ModelMesh reads them. Only what the
    # user wrote counts towards the concrete id, so the ids of existing models don't move.
    from_annotations: dict[str, str] = {}
    if "storageUri" in model:
        if storage.get("path"):
            raise doc.error(at + ("storage", "path"), "cannot be used together with storageUri: keep one")
        storage["uri"] = model["storageUri"]
        if ann.get(SCHEMA_PATH_ANNOTATION) and not storage.get("schemaPath"):
            storage["schemaPath"] = from_annotations["schemaPath"] = str(ann[SCHEMA_PATH_ANNOTATION])
    if ann.get(SECRET_KEY_ANNOTATION) and not storage.get("key"):
        storage["key"] = from_annotations["key"] = str(ann[SECRET_KEY_ANNOTATION])
    if not storage.get("path") and not storage.get("uri"):
        raise doc.error(at + ("storage",), "needs `path` (with a key or pvc) or storageUri")
    check_storage_paths(doc, storage, at + ("storage", "path"), at + ("storageUri",))
    if ann.get(BASE_ANNOTATION):
        # Another base is another model: the id moves with it (and stays put for models without one).
        from_annotations["base"] = str(ann[BASE_ANNOTATION])
    hashed: dict[str, Any] = predictor if not from_annotations else {**predictor, "annotations": from_annotations}
    from meshserve.transformer import has_transformer, predictor_name

    return ModelSpec(
        id=concrete_model_id(name, hashed),
        # With a transformer, `name` reaches the transformer and the predictor goes by a derived
        # name (meshserve/transformer.py); the id stays the InferenceService's.
        alias=predictor_name(name) if has_transformer(d) else name,
        namespace=str(meta.get("namespace") or "default"),
        format=fmt_name,
        format_version=fmt_version,
        runtime=str(model.get("runtime") or ""),
        storage=storage,
        **_copies(doc, meta),
    )


def _schema_error(doc: Document, err: jsonschema.ValidationError, root: tuple[str, ...]) -> ConfigError:
    path = root + tuple(str(p) for p in err.absolute_path)
    if err.validator == "required":
        missing = next((f for f in err.validator_value if f not in (err.instance or {})), "")
        return doc.error(path + (missing,), "required")
    return doc.error(path, err.message)


def parse_predictor(doc: Document) -> ModelSpec:
    """ModelMesh's Predictor (serving.kserve.io/v1alpha1) as a ModelSpec. The storage forms, in
    ModelMesh's order of precedence:
    - `storage.s3: {secretKey, bucket}` + `path`: the storage-config key and an optional bucket;
    - `storage.key` / `storage.path` / `storage.parameters` (the newer StorageSpec fields);
    - `storage.persistentVolumeClaim: {claimName}` + `path`: files on a PVC (ModelMesh marks
      this form deprecated and refuses it; meshserve serves it, as it does a pvc store);
    - no storage: `path` in the storage-config's `default` store."""
    d = doc.data
    if not isinstance(d, dict) or d.get("kind") != PREDICTOR_KIND:
        raise doc.error(("kind",), f"expected {PREDICTOR_KIND}")
    meta, name = _name(doc, PREDICTOR_KIND)
    spec = d.get("spec")
    if not isinstance(spec, dict):
        raise doc.error(("spec",), "required: a mapping with modelType, path and storage")
    errors = sorted(_PREDICTOR_VALIDATOR.iter_errors(spec), key=lambda e: -len(list(e.absolute_path)))
    if errors:
        raise _schema_error(doc, errors[0], ("spec",))
    st = spec.get("storage") or {}
    path = str(st.get("path") or spec.get("path") or "")
    if not path:
        raise doc.error(("spec", "path"), "required: the model's path in its store (spec.path or spec.storage.path)")
    storage: dict[str, Any] = {"path": path}
    check_storage_paths(doc, storage, ("spec", "storage", "path") if st.get("path") else ("spec", "path"))
    params = dict(st.get("parameters") or {})
    pvc, s3 = st.get("persistentVolumeClaim"), st.get("s3")
    if pvc and (s3 or st.get("key")):
        raise doc.error(("spec", "storage", "persistentVolumeClaim"), "cannot be used together with s3 or key: keep one store")
    if pvc:
        storage["parameters"] = {**params, "type": "pvc", "name": pvc["claimName"]}
    else:
        key = str(st.get("key") or (s3 or {}).get("secretKey") or "")
        if key:
            storage["key"] = key
        if s3 and s3.get("bucket"):
            params["bucket"] = s3["bucket"]
        if params:
            storage["parameters"] = params
    schema_path = st.get("schemaPath") or spec.get("schemaPath")
    if schema_path:
        storage["schemaPath"] = str(schema_path)
    return ModelSpec(
        id=concrete_model_id(name, spec, PREDICTOR_SOURCE),
        alias=name,
        namespace=str(meta.get("namespace") or "default"),
        format=spec["modelType"]["name"],
        format_version=str(spec["modelType"].get("version") or ""),
        runtime=str((spec.get("runtime") or {}).get("name") or ""),
        storage=storage,
        **_copies(doc, meta),
    )


def _escapes(rel: str) -> bool:
    return any(part == ".." for part in PurePosixPath(rel).parts)


def check_storage_paths(doc: Document, storage: dict[str, Any], path_at: tuple[str, ...] = ("spec", "predictor", "model", "storage", "path"),
                        uri_at: tuple[str, ...] = ("spec", "predictor", "model", "storageUri")) -> None:
    """Refuse storage that names files outside its store root. The loader refuses them too, but
    only at load time, where the failure excludes the pod from the model for
    failed_pod_exclusion_seconds; here the user hears of it at apply, with file:line."""
    path, uri = storage.get("path"), storage.get("uri")
    if path is not None:
        where = path_at
        if not isinstance(path, str):
            raise doc.error(where, "must be a string: a path relative to the store root")
        if PurePosixPath(path).is_absolute() or _escapes(path):
            raise doc.error(where, f"{path!r} escapes the store root: give a path relative to it, with no '..'")
    if uri is not None:
        where = uri_at
        if not isinstance(uri, str):
            raise doc.error(where, "must be a string URI")
        scheme, sep, rest = uri.partition("://")
        if not sep:
            return
        if scheme == "file":
            if not PurePosixPath(rest).is_absolute() or _escapes(rest):
                raise doc.error(where, f"{uri!r}: a file:// path must be absolute, with no '..'")
        elif scheme in ("pvc", "s3"):
            root, _, rel = rest.partition("/")
            if not root or root in (".", ".."):
                raise doc.error(where, f"{uri!r}: needs a {'volume' if scheme == 'pvc' else 'bucket'} name first")
            if _escapes(rel):
                raise doc.error(where, f"{uri!r} escapes its {'volume' if scheme == 'pvc' else 'bucket'}: no '..' in the path")


def is_inference_service(doc: Document) -> bool:
    return isinstance(doc.data, dict) and doc.data.get("kind") == ISVC_KIND


def is_model(doc: Document) -> bool:
    """An InferenceService or a Predictor: a document that defines one model."""
    return isinstance(doc.data, dict) and doc.data.get("kind") in MODEL_KINDS


def parse_model(doc: Document) -> ModelSpec:
    """Either model kind, its apiVersion checked first."""
    check_api_version(doc)
    if doc.data.get("kind") == PREDICTOR_KIND:
        return parse_predictor(doc)
    return parse_inference_service(doc)


def check_api_version(doc: Document) -> None:
    want = MODEL_KINDS.get(doc.data.get("kind"), ISVC_API)
    if doc.data.get("apiVersion") != want:
        raise ConfigError(doc.file, doc.line_of(("apiVersion",)), "apiVersion", f"expected {want} for a {doc.data.get('kind')}")
