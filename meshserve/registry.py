"""The model registry's input side: InferenceService resources (KServe v1beta1, ModelMesh mode)
turned into ModelSpecs. Pure: the same code parses mesh-config/ files and objects from the
Kubernetes API, so both modes share one schema and one code path after parsing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

from meshserve.model import ModelSpec
from meshserve.yamlfile import ConfigError, Document

ISVC_API = "serving.kserve.io/v1beta1"
ISVC_KIND = "InferenceService"
MODELMESH_ANNOTATION = "serving.kserve.io/deploymentMode"
MESHSERVE_ANNOTATION_PREFIX = "meshserve.io/"


def concrete_model_id(name: str, predictor: dict[str, Any]) -> str:
    """ModelMesh's naming: the alias plus the first 10 hex of SHA-1 of the predictor spec JSON.

    A spec change yields a new concrete model, which is how version moves work."""
    canonical = json.dumps(predictor, sort_keys=True, separators=(",", ":"))
    return f"{name}__isvc-{hashlib.sha1(canonical.encode()).hexdigest()[:10]}"


def parse_inference_service(doc: Document) -> ModelSpec:
    d = doc.data
    if not isinstance(d, dict):
        raise doc.error((), "expected a mapping (an InferenceService resource)")
    if d.get("kind") != ISVC_KIND:
        raise doc.error(("kind",), f"expected {ISVC_KIND}, got {d.get('kind')!r}")
    meta = d.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise doc.error(("metadata", "name"), "required: the InferenceService name")
    name = meta["name"]
    if "__" in name or "/" in name:
        raise doc.error(("metadata", "name"), "must not contain '__' or '/'")
    spec = d.get("spec")
    predictor = spec.get("predictor") if isinstance(spec, dict) else None
    if not isinstance(predictor, dict):
        raise doc.error(("spec", "predictor"), "required")
    model = predictor.get("model")
    if not isinstance(model, dict):
        raise doc.error(("spec", "predictor", "model"), "required")
    fmt = model.get("modelFormat")
    if not isinstance(fmt, dict) or not isinstance(fmt.get("name"), str):
        raise doc.error(("spec", "predictor", "model", "modelFormat", "name"), "required, e.g. sklearn")
    storage = dict(model.get("storage") or {})
    if "storageUri" in model:
        storage["uri"] = model["storageUri"]
    if not storage.get("path") and not storage.get("uri"):
        raise doc.error(("spec", "predictor", "model", "storage"), "needs `path` (with a key or pvc) or storageUri")
    check_storage_paths(doc, storage)
    ann = meta.get("annotations") or {}

    def ann_int(key: str, default: int) -> int:
        raw = ann.get(MESHSERVE_ANNOTATION_PREFIX + key)
        if raw is None:
            return default
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise doc.error(("metadata", "annotations", MESHSERVE_ANNOTATION_PREFIX + key), "must be an integer") from None

    return ModelSpec(
        id=concrete_model_id(name, predictor),
        alias=name,
        namespace=str(meta.get("namespace") or "default"),
        format=fmt["name"],
        format_version=str(fmt.get("version") or ""),
        runtime=str(model.get("runtime") or ""),
        storage=storage,
        min_copies=ann_int("minCopies", 0),
        max_copies=ann_int("maxCopies", 0),
        pinned=str(ann.get(MESHSERVE_ANNOTATION_PREFIX + "pinned", "false")).lower() == "true",
    )


def _escapes(rel: str) -> bool:
    return any(part == ".." for part in PurePosixPath(rel).parts)


def check_storage_paths(doc: Document, storage: dict[str, Any]) -> None:
    """Refuse storage that names files outside its store root. The loader refuses them too, but
    only at load time, where the failure excludes the pod from the model for
    failed_pod_exclusion_seconds; here the user hears of it at apply, with file:line."""
    path, uri = storage.get("path"), storage.get("uri")
    if path is not None:
        where = ("spec", "predictor", "model", "storage", "path")
        if not isinstance(path, str):
            raise doc.error(where, "must be a string: a path relative to the store root")
        if PurePosixPath(path).is_absolute() or _escapes(path):
            raise doc.error(where, f"{path!r} escapes the store root: give a path relative to it, with no '..'")
    if uri is not None:
        where = ("spec", "predictor", "model", "storageUri")
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


def check_api_version(doc: Document) -> None:
    if doc.data.get("apiVersion") != ISVC_API:
        raise ConfigError(doc.file, doc.line_of(("apiVersion",)), "apiVersion", f"expected {ISVC_API}")
