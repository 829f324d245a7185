"""ModelMesh's `model-serving-config` ConfigMap: the system-wide settings a ModelMesh user
already has, read as meshserve settings.

The ConfigMap holds one key, `config.yaml`, whose YAML overrides ModelMesh's defaults
(kserve/modelmesh-serving config/default/config-defaults.yaml, controllers/config.go). Each
key either maps onto a meshserve setting (`Settings` for `meshserve up`, the controller's
options in cluster mode) or has no meaning in meshserve and yields one warning naming it, so
nothing a user wrote is dropped silently. docs/compatibility.md has the table.

Pure: a ConfigMap (as parsed YAML or an API object) in, a `ServingConfig` out. Nothing here
does I/O; `meshserve up` and the controller apply the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jsonschema
import yaml

from meshserve.settings import MAX_REQUEST_BYTES
from meshserve.yamlfile import ConfigError, Document

CONFIGMAP_NAME = "model-serving-config"
CONFIG_KEY = "config.yaml"
# ModelMesh's built-in server types (ServingRuntime builtInAdapter.serverType).
SERVER_TYPES = ("triton", "mlserver", "ovms", "torchserve")

# The types ModelMesh's Config struct gives the keys meshserve maps; a wrong type is refused
# with the key's file:line, as any other YAML error.
_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "podsPerRuntime": {"type": "integer", "minimum": 0},
        "scaleToZero": {"type": "object", "properties": {"enabled": {"type": "boolean"}, "gracePeriodSeconds": {"type": "integer", "minimum": 0}}},
        "grpcMaxMessageSizeBytes": {"type": "integer", "minimum": 1},
        "restProxy": {"type": "object", "properties": {"enabled": {"type": "boolean"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535}}},
        "metrics": {"type": "object", "properties": {"enabled": {"type": "boolean"}}},
        "builtInServerTypes": {"type": "array", "items": {"enum": list(SERVER_TYPES)}},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(_SCHEMA)


@dataclass
class ServingConfig:
    """What a model-serving-config means to meshserve.

    `settings`: Settings fields for `meshserve up` (only the keys the user wrote).
    `scale_to_zero`, `scale_grace_seconds`, `pool_replicas`, `server_types`: the controller's
    options in cluster mode (None: not set, keep the controller's own default).
    `warnings`: one line per key that meshserve does not act on, naming the key."""

    settings: dict[str, Any] = field(default_factory=dict)
    scale_to_zero: bool | None = None
    scale_grace_seconds: float | None = None
    pool_replicas: int | None = None  # podsPerRuntime: what a pool scales up to from zero
    server_types: frozenset[str] | None = None  # builtInServerTypes
    warnings: list[str] = field(default_factory=list)


def is_serving_config(data: Any) -> bool:
    return (isinstance(data, dict) and data.get("kind") == "ConfigMap"
            and (data.get("metadata") or {}).get("name") == CONFIGMAP_NAME)


# Keys whose sub-keys are mapped one by one (scaleToZero.enabled); every other key is
# one setting as a whole (storageHelperResources), mapped or warned about once.
_NESTED = ("scaleToZero", "restProxy", "metrics")


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in _NESTED and isinstance(v, dict) and v:
            out.update({f"{k}.{sub}": sv for sub, sv in v.items()})
        else:
            out[str(k)] = v
    return out


def _no_meaning(why: str) -> Callable[[ServingConfig, Any], str]:
    return lambda cfg, v: why


def _grpc_max(cfg: ServingConfig, v: int) -> str:
    # meshserve's hops (gateway, activator, runtimes) take 64 MiB messages; a smaller
    # ModelMesh limit is within that, a bigger one is not met.
    if v > MAX_REQUEST_BYTES:
        return f"asks for {v} bytes, more than meshserve's fixed {MAX_REQUEST_BYTES} (64 MiB) on every hop: larger messages are refused"
    return ""


def _rest_enabled(cfg: ServingConfig, v: bool) -> str:
    return "" if v else "is false, but meshserve's gateway always serves REST (on restProxy.port / MESHSERVE_GATEWAY_REST_PORT)"


def _metrics_enabled(cfg: ServingConfig, v: bool) -> str:
    return "" if v else "is false, but every meshserve component always serves Prometheus metrics (docs/metrics.md)"


def _set(**kv: Callable[[Any], Any]) -> Callable[[ServingConfig, Any], str]:
    def apply(cfg: ServingConfig, v: Any) -> str:
        for name, conv in kv.items():
            if name in ("scale_to_zero", "scale_grace_seconds", "pool_replicas", "server_types"):
                setattr(cfg, name, conv(v))
            else:
                cfg.settings[name] = conv(v)
        return ""
    return apply


# key -> what to do with its value: set settings (returns "") or explain why it is not acted
# on (returns the warning's reason). Keys not listed here are unknown to meshserve.
MAPPING: dict[str, Callable[[ServingConfig, Any], str]] = {
    # Local: how many runtime pods `meshserve up` starts. Cluster: the replicas a runtime
    # pool is scaled up to from zero (from there the HPA scales on cache pressure).
    "podsPerRuntime": _set(pods=lambda v: max(1, int(v)), pool_replicas=lambda v: max(1, int(v))),
    "scaleToZero.enabled": _set(scale_to_zero=bool),
    "scaleToZero.gracePeriodSeconds": _set(scale_grace_seconds=float),
    "grpcMaxMessageSizeBytes": _grpc_max,
    "restProxy.enabled": _rest_enabled,
    "restProxy.port": _set(gateway_rest_port=int),
    "metrics.enabled": _metrics_enabled,
    "builtInServerTypes": _set(server_types=frozenset),
    # Deploy-time keys: in meshserve they are fields of the manifests in istio/, which the
    # controller does not generate (ModelMesh's controller did).
    "storageHelperResources": _no_meaning("sets the loader container's resources: edit them in istio/runtime-builtin.yaml and runtime-mlserver.yaml (container `loader`)"),
}


def parse(doc: Document) -> ServingConfig:
    """Raises ConfigError (file:line: field: reason) for a ConfigMap whose config.yaml is not
    YAML or gives a mapped key the wrong type."""
    data = doc.data.get("data") or {}
    if not isinstance(data, dict):
        raise doc.error(("data",), f"must be a mapping with the key {CONFIG_KEY!r}")
    cfg = ServingConfig()
    for k in data:
        if k != CONFIG_KEY:
            cfg.warnings.append(f"{doc.file}:{doc.line_of(('data', k))}: data.{k}: ignored: meshserve reads only data.{CONFIG_KEY}, as ModelMesh does")
    text = data.get(CONFIG_KEY)
    if text is None:
        return cfg
    where = ("data", CONFIG_KEY)
    try:
        user = yaml.safe_load(str(text)) or {}
        node = yaml.compose(str(text), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise doc.error(where, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(user, dict):
        raise doc.error(where, "must be a YAML mapping of ModelMesh settings (e.g. podsPerRuntime: 2)")
    inner = Document(doc.file, user, node)

    def line(path: tuple[str | int, ...]) -> int:
        # config.yaml is a block scalar (`config.yaml: |`) in every ModelMesh example: its
        # text starts on the line after the key, so a key's line is the two added up.
        outer = doc.line_of(where)
        return outer + inner.line_of(path) if outer and doc.node is not None else 0

    errors = list(_VALIDATOR.iter_errors(user))
    if errors:
        e = errors[0]
        path = tuple(e.absolute_path)
        raise ConfigError(doc.file, line(path), f"{CONFIG_KEY}: " + ".".join(str(p) for p in path), e.message)
    for key, value in sorted(_flatten(user).items()):
        act = MAPPING.get(key)
        at = line(tuple(key.split(".")))
        where_s = f"{doc.file}:{at}" if at else doc.file
        if act is None:
            cfg.warnings.append(f"{where_s}: {CONFIG_KEY}: {key}: ignored: meshserve has no setting for this ModelMesh key")
            continue
        why = act(cfg, value)
        if why:
            cfg.warnings.append(f"{where_s}: {CONFIG_KEY}: {key}: ignored: {why}")
    return cfg


def from_object(obj: dict[str, Any]) -> ServingConfig:
    """The ConfigMap as the API returns it (cluster mode)."""
    meta = obj.get("metadata") or {}
    return parse(Document(f"k8s:ConfigMap/{meta.get('namespace', '')}/{meta.get('name', CONFIGMAP_NAME)}", obj, None))
