"""The ModelMesh `storage-config` Secret: one key per store, each value a JSON object whose `type`
says what it is (s3, http, pvc); the `default` key is the fallback; `storage.key` picks one.

Pure parsing. Reading from disk is `load_storage_config` at the bottom: a JSON/YAML file (a plain
mapping or a whole Secret resource with `data`/`stringData`) or a directory where Kubernetes
mounted the Secret, one file per key.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULT_KEY = "default"
STORE_TYPES = ("s3", "http", "pvc")
# KServe's own S3 secret form (plain aws_* keys plus annotations), as users also write it.
KSERVE_S3_KEYS = ("aws_access_key_id", "aws_secret_access_key")


class StorageConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Store:
    key: str
    type: str
    access_key_id: str = ""
    secret_access_key: str = ""
    endpoint_url: str = ""
    region: str = ""
    bucket: str = ""
    url: str = ""  # http: base URL the model path is appended to
    headers: tuple[tuple[str, str], ...] = ()
    name: str = ""  # pvc: volume name
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def redacted(self) -> dict[str, Any]:
        """For logs and errors: never print a secret."""
        return {"key": self.key, "type": self.type, "endpoint_url": self.endpoint_url, "bucket": self.bucket, "url": self.url}


def parse_store(key: str, value: Any) -> Store:
    """One entry. `value` is the JSON text (or already-parsed mapping) of a storage-config key."""
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise StorageConfigError(f"storage-config key {key!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise StorageConfigError(f"storage-config key {key!r} must be a JSON object with a 'type'")
    typ = str(value.get("type") or "").lower()
    if typ not in STORE_TYPES:
        raise StorageConfigError(f"storage-config key {key!r}: type {typ!r} is not one of {', '.join(STORE_TYPES)}")
    headers = value.get("headers") or {}
    if not isinstance(headers, dict):
        raise StorageConfigError(f"storage-config key {key!r}: headers must be a JSON object")
    if typ == "http" and not str(value.get("url") or "").startswith(("http://", "https://")):
        raise StorageConfigError(f"storage-config key {key!r}: an http store needs a 'url' starting with http:// or https://")
    known = {"type", "access_key_id", "secret_access_key", "endpoint_url", "region", "bucket", "url", "headers", "name"}
    return Store(
        key=key,
        type=typ,
        access_key_id=str(value.get("access_key_id") or ""),
        secret_access_key=str(value.get("secret_access_key") or ""),
        endpoint_url=str(value.get("endpoint_url") or ""),
        region=str(value.get("region") or value.get("default_region") or ""),
        bucket=str(value.get("bucket") or value.get("default_bucket") or ""),
        url=str(value.get("url") or ""),
        headers=tuple(sorted((str(k), str(v)) for k, v in headers.items())),
        name=str(value.get("name") or ""),
        extra=tuple(sorted((str(k), str(v)) for k, v in value.items() if k not in known)),
    )


def parse_secret(doc: Mapping[str, Any]) -> dict[str, Store]:
    """A Secret resource (data is base64, stringData plain, stringData wins as in Kubernetes) or
    a plain {key: json} mapping."""
    if doc.get("kind") == "Secret" or "data" in doc or "stringData" in doc:
        entries: dict[str, Any] = {}
        for k, v in (doc.get("data") or {}).items():
            try:
                entries[k] = base64.b64decode(str(v), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise StorageConfigError(f"Secret data key {k!r} is not valid base64 text") from None
        entries.update(doc.get("stringData") or {})
        annotations = (doc.get("metadata") or {}).get("annotations") or {}
    else:
        entries, annotations = dict(doc), {}
    if set(KSERVE_S3_KEYS) <= set(entries):
        return {DEFAULT_KEY: _kserve_s3_store(entries, annotations)}
    return {k: parse_store(k, v) for k, v in entries.items()}


def _kserve_s3_store(entries: Mapping[str, Any], annotations: Mapping[str, Any]) -> Store:
    # KServe's form has no bucket: it comes from the model's s3:// URI.
    endpoint = str(annotations.get("serving.kserve.io/s3-endpoint") or "")
    if endpoint and "://" not in endpoint:
        https = str(annotations.get("serving.kserve.io/s3-usehttps", "1")) not in ("0", "false")
        endpoint = ("https://" if https else "http://") + endpoint
    return Store(
        key=DEFAULT_KEY,
        type="s3",
        access_key_id=str(entries["aws_access_key_id"]),
        secret_access_key=str(entries["aws_secret_access_key"]),
        endpoint_url=endpoint,
        region=str(annotations.get("serving.kserve.io/s3-region") or ""),
    )


def pick_store(stores: Mapping[str, Store], key: str | None) -> Store:
    """`storage.key`, else the `default` entry. Errors name the keys that do exist."""
    if key:
        if key in stores:
            return stores[key]
        raise StorageConfigError(
            f"storage key {key!r} is not in the storage-config (it has: {', '.join(sorted(stores)) or 'no keys'}); "
            "add it to the storage-config Secret or fix storage.key"
        )
    if DEFAULT_KEY in stores:
        return stores[DEFAULT_KEY]
    raise StorageConfigError("the model names no storage.key and the storage-config has no 'default' key")


def load_storage_config(path: Path | str | None) -> dict[str, Store]:
    """Read a storage-config from a file (JSON or YAML, Secret or plain mapping) or a directory
    (a mounted Secret: one file per key). No path: no stores."""
    if not path:
        return {}
    p = Path(path)
    if p.is_dir():
        return {f.name: parse_store(f.name, f.read_text()) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")}
    if not p.exists():
        raise StorageConfigError(f"storage-config {p} does not exist; set MESHSERVE_STORAGE_CONFIG to the file or mounted Secret")
    try:
        doc = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise StorageConfigError(f"storage-config {p} is not YAML or JSON: {e}") from None
    if not isinstance(doc, dict):
        raise StorageConfigError(f"storage-config {p} must be a mapping or a Secret resource")
    return parse_secret(doc)
