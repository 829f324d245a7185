"""The ModelMesh `storage-config` Secret: one key per store, each value a JSON object whose `type`
says what it is (s3, gcs, azure, http, pvc: ModelMesh's five); the `default` key is the
fallback; `storage.key` picks one.

Each entry is parsed on its own: one that is not JSON, has a type meshserve doesn't handle or
misses a field becomes a `BadStore` holding the reason, and only the models that name that key
fail to load (with that reason); every other key keeps working.

Pure parsing down to `load_storage_config`; `StorageConfigSource` at the bottom re-reads the file
or mounted Secret directory when it changes, so an edited Secret takes effect without a restart.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

log = logging.getLogger("meshserve.loader.storage_config")

DEFAULT_KEY = "default"
STORE_TYPES = ("s3", "gcs", "azure", "http", "pvc")
# KServe's own S3 secret form (plain aws_* keys plus annotations), as users also write it.
KSERVE_S3_KEYS = ("aws_access_key_id", "aws_secret_access_key")
# What a fixed entry needs to say, appended to every per-entry error.
FIX_HINT = "fix this entry in the storage-config Secret; the loader re-reads it when it changes, no restart needed"


class StorageConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Store:
    key: str
    type: str
    access_key_id: str = ""
    secret_access_key: str = ""
    endpoint_url: str = ""  # s3; gcs/azure too (meshserve's addition): an emulator or private endpoint
    region: str = ""
    bucket: str = ""  # s3, gcs
    url: str = ""  # http: base URL the model path is appended to
    headers: tuple[tuple[str, str], ...] = ()
    name: str = ""  # pvc: volume name
    certificate: str = ""  # s3: PEM CA bundle that signed a private endpoint's certificate
    # gcs: a service account (private_key + client_email, optional token_uri), or neither: anonymous.
    private_key: str = ""
    client_email: str = ""
    token_uri: str = ""
    project_id: str = ""
    # azure: account_name + container, and one of connection_string, a service principal
    # (client_id + client_secret + tenant_id), or nothing (anonymous: a public container).
    account_name: str = ""
    container: str = ""
    connection_string: str = ""
    client_id: str = ""
    client_secret: str = ""
    tenant_id: str = ""
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def redacted(self) -> dict[str, Any]:
        """For logs and errors: never print a secret."""
        return {"key": self.key, "type": self.type, "endpoint_url": self.endpoint_url, "bucket": self.bucket, "url": self.url,
                "account_name": self.account_name, "container": self.container}


@dataclass(frozen=True)
class BadStore:
    """An entry that can't be used, and why. Stands in the stores mapping under its key, so a
    model naming it fails with this reason instead of 'no such key', and no other key is hurt."""

    key: str
    reason: str
    type: str = ""  # the declared type, when there was one (for logs)


AnyStore = Union[Store, BadStore]

_COMMON = {"type", "endpoint_url", "region", "bucket", "default_bucket", "default_region", "headers"}
_S3 = {"access_key_id", "secret_access_key", "certificate"}
_GCS = {"private_key", "client_email", "token_uri", "project_id"}
_AZURE = {"account_name", "container", "connection_string", "client_id", "client_secret", "tenant_id"}
_KNOWN = _COMMON | _S3 | _GCS | _AZURE | {"url", "name"}


def _str(value: Mapping[str, Any], k: str) -> str:
    v = value.get(k)
    if v is None:
        return ""
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise StorageConfigError(f"'{k}' must be a string")
    return str(v)


def parse_store(key: str, value: Any) -> Store:
    """One entry. `value` is the JSON text (or already-parsed mapping) of a storage-config key.
    Raises StorageConfigError saying what is wrong; `parse_entry` turns that into a BadStore."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise StorageConfigError(f"storage-config key {key!r} is not UTF-8 text") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise StorageConfigError(f"storage-config key {key!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise StorageConfigError(f"storage-config key {key!r} must be a JSON object with a 'type'")
    typ = str(value.get("type") or "").lower()
    if typ not in STORE_TYPES:
        raise StorageConfigError(f"storage-config key {key!r}: type {typ!r} is not one of {', '.join(STORE_TYPES)}")
    try:
        s = {k: _str(value, k) for k in _KNOWN - {"headers", "type"}}
    except StorageConfigError as e:
        raise StorageConfigError(f"storage-config key {key!r}: {e}") from None
    headers = value.get("headers") or {}
    if not isinstance(headers, dict):
        raise StorageConfigError(f"storage-config key {key!r}: headers must be a JSON object")
    problem = _check(typ, s)
    if problem:
        raise StorageConfigError(f"storage-config key {key!r} ({typ}): {problem}")
    return Store(
        key=key,
        type=typ,
        access_key_id=s["access_key_id"],
        secret_access_key=s["secret_access_key"],
        endpoint_url=s["endpoint_url"],
        region=s["region"] or s["default_region"],
        bucket=s["bucket"] or s["default_bucket"],
        url=s["url"],
        headers=tuple(sorted((str(k), str(v)) for k, v in headers.items())),
        name=s["name"],
        certificate=s["certificate"],
        private_key=s["private_key"],
        client_email=s["client_email"],
        token_uri=s["token_uri"],
        project_id=s["project_id"],
        account_name=s["account_name"],
        container=s["container"],
        connection_string=s["connection_string"],
        client_id=s["client_id"],
        client_secret=s["client_secret"],
        tenant_id=s["tenant_id"],
        extra=tuple(sorted((str(k), str(v)) for k, v in value.items() if k not in _KNOWN)),
    )


def _check(typ: str, s: Mapping[str, str]) -> str:
    """What an entry of type `typ` lacks or gets wrong ("" when usable). The rules are
    ModelMesh's (its runtime adapter refuses the same entries), worded as what to do."""
    if s["endpoint_url"] and not s["endpoint_url"].startswith(("http://", "https://")):
        return f"endpoint_url {s['endpoint_url']!r} must start with http:// or https://"
    if typ == "s3":
        if s["certificate"] and "-----BEGIN CERTIFICATE-----" not in s["certificate"]:
            return "'certificate' must be the PEM text of the CA bundle (-----BEGIN CERTIFICATE-----...), not a path or base64 of it"
    elif typ == "gcs":
        if bool(s["private_key"]) != bool(s["client_email"]):
            return "give both private_key and client_email (a service account's key), or neither for anonymous access to a public bucket"
        if s["private_key"] and "PRIVATE KEY-----" not in s["private_key"]:
            return "'private_key' must be the PEM private key from the service account's JSON key file (-----BEGIN PRIVATE KEY-----...)"
    elif typ == "azure":
        if not s["container"]:
            return "'container' is required: the blob container the models are in"
        if not (s["account_name"] or s["connection_string"] or s["endpoint_url"]):
            return "'account_name' is required (the storage account), or a connection_string"
        sp = [k for k in ("client_id", "client_secret", "tenant_id") if s[k]]
        if sp and len(sp) != 3:
            missing = sorted({"client_id", "client_secret", "tenant_id"} - set(sp))
            return f"a service principal needs client_id, client_secret and tenant_id; missing {', '.join(missing)}"
    elif typ == "http":
        if not s["url"].startswith(("http://", "https://")):
            return "an http store needs a 'url' starting with http:// or https://"
    elif typ == "pvc":
        if not s["name"] or "/" in s["name"]:
            return "a pvc store needs 'name': the PersistentVolumeClaim's name (mounted as a volume of the runtime pod)"
    return ""


def parse_entry(key: str, value: Any) -> AnyStore:
    """`parse_store`, but a bad entry becomes a BadStore instead of an error: one bad entry
    must never take the other keys down with it."""
    try:
        return parse_store(key, value)
    except StorageConfigError as e:
        typ = ""
        try:
            typ = str((json.loads(value) if isinstance(value, (str, bytes)) else value).get("type") or "")
        except (ValueError, AttributeError, TypeError):
            pass
        return BadStore(key, str(e), typ)


def parse_secret(doc: Mapping[str, Any]) -> dict[str, AnyStore]:
    """A Secret resource (data is base64, stringData plain, stringData wins as in Kubernetes) or
    a plain {key: json} mapping. A bad entry becomes a BadStore under its key."""
    bad: dict[str, AnyStore] = {}
    if doc.get("kind") == "Secret" or "data" in doc or "stringData" in doc:
        entries: dict[str, Any] = {}
        for k, v in (doc.get("data") or {}).items():
            try:
                entries[k] = base64.b64decode(str(v), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                bad[k] = BadStore(k, f"Secret data key {k!r} is not valid base64 text; {FIX_HINT}")
        entries.update(doc.get("stringData") or {})
        annotations = (doc.get("metadata") or {}).get("annotations") or {}
    else:
        entries, annotations = dict(doc), {}
    if set(KSERVE_S3_KEYS) <= set(entries):
        return {DEFAULT_KEY: _kserve_s3_store(entries, annotations)}
    out: dict[str, AnyStore] = {k: parse_entry(k, v) for k, v in entries.items()}
    return {**{k: b for k, b in bad.items() if k not in out}, **out}


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


def pick_store(stores: Mapping[str, AnyStore], key: str | None, config_error: str = "") -> Store:
    """`storage.key`, else the `default` entry. Errors name the keys that do exist, or say why
    the entry (or, with `config_error`, the whole storage-config) can't be used."""
    if config_error and not stores:
        raise StorageConfigError(f"the storage-config can't be read: {config_error}")
    want = key or DEFAULT_KEY
    found = stores.get(want)
    if isinstance(found, BadStore):
        raise StorageConfigError(f"{found.reason}; {FIX_HINT}")
    if found is not None:
        return found
    if key:
        raise StorageConfigError(
            f"storage key {key!r} is not in the storage-config (it has: {', '.join(sorted(stores)) or 'no keys'}); "
            "add it to the storage-config Secret or fix storage.key"
        )
    raise StorageConfigError("the model names no storage.key and the storage-config has no 'default' key")


def load_storage_config(path: Path | str | None) -> dict[str, AnyStore]:
    """Read a storage-config from a file (JSON or YAML, Secret or plain mapping) or a directory
    (a mounted Secret: one file per key). No path: no stores. Raises StorageConfigError only
    when the whole of it is unreadable; a bad entry is a BadStore."""
    if not path:
        return {}
    p = Path(path)
    if p.is_dir():
        out: dict[str, AnyStore] = {}
        # Kubernetes' own entries (..data, ..2024_01_01...) start with a dot; key files are
        # symlinks into ..data, so is_file() follows them.
        for f in sorted(p.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            try:
                out[f.name] = parse_entry(f.name, f.read_bytes())
            except OSError as e:
                out[f.name] = BadStore(f.name, f"storage-config key {f.name!r} can't be read from {f}: {e}")
        return out
    if not p.exists():
        raise StorageConfigError(f"storage-config {p} does not exist; set MESHSERVE_STORAGE_CONFIG to the file or mounted Secret")
    try:
        doc = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise StorageConfigError(f"storage-config {p} is not YAML or JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StorageConfigError(f"storage-config {p} can't be read: {e}") from None
    if not isinstance(doc, dict):
        raise StorageConfigError(f"storage-config {p} must be a mapping or a Secret resource")
    return parse_secret(doc)


# --- Reloading -------------------------------------------------------------------------------


def _signature(p: Path) -> tuple[Any, ...]:
    """What changes when the storage-config does, from stat calls alone (no reads): cheap
    enough to take before every pull. Kubernetes updates a mounted Secret by writing a new
    `..<timestamp>` directory and swapping the `..data` symlink to it, so the key files (symlinks
    through `..data`) resolve to new inodes; a plain file edited or replaced in place changes its
    inode, mtime, ctime or size."""

    def st(q: Path) -> tuple[int, ...]:
        s = q.stat()  # follows symlinks: the file the content comes from
        return (s.st_dev, s.st_ino, s.st_mtime_ns, s.st_ctime_ns, s.st_size)

    try:
        if p.is_dir():
            data = p / "..data"
            parts: list[Any] = ["dir", st(p), os.readlink(data) if data.is_symlink() else ""]
            for f in sorted(p.iterdir()):
                if not f.name.startswith("."):
                    try:
                        parts.append((f.name, st(f)))
                    except OSError:
                        parts.append((f.name, "dangling"))
            return tuple(parts)
        return ("file", st(p), os.readlink(p) if p.is_symlink() else "")
    except FileNotFoundError:
        return ("missing",)
    except OSError as e:
        return ("error", str(e))


@dataclass(frozen=True)
class Snapshot:
    stores: Mapping[str, AnyStore]
    error: str = ""  # the whole storage-config is unreadable (missing file, not YAML...)
    generation: int = 0  # counts the reads that found a change, from 1


class StorageConfigSource:
    """The storage-config as it is on disk now. `current()` compares the file's (or mounted
    directory's) stat signature with the one last read, and re-reads only when it changed: a
    Secret edited in Kubernetes reaches the next pull (once the kubelet has synced the volume,
    typically within a minute) without restarting the loader. Thread-safe."""

    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._sig: tuple[Any, ...] | None = None
        self._snap = Snapshot({})
        self.reloads = 0  # re-reads after the first (for tests and logs)

    def current(self) -> Snapshot:
        if self.path is None:
            return self._snap
        with self._lock:
            sig = _signature(self.path)
            if sig == self._sig:
                return self._snap
            # Read, then check nothing moved meanwhile (a file rewritten in place while we read
            # it could be half-written); bounded, and the last read stands if it never settles.
            for _ in range(3):
                try:
                    stores, error = load_storage_config(self.path), ""
                except StorageConfigError as e:
                    stores, error = {}, str(e)
                after = _signature(self.path)
                if after == sig:
                    break
                sig = after
            first = self._sig is None
            self._sig = sig
            self._snap = Snapshot(stores, error, self._snap.generation + 1)
            if not first:
                self.reloads += 1
            self._log(first)
            return self._snap

    def _log(self, first: bool) -> None:
        snap = self._snap
        what = "read" if first else "changed, re-read"
        if snap.error:
            log.error("storage-config %s %s: unusable, only local/pvc and plain http models will load: %s", self.path, what, snap.error)
            return
        good = sorted(k for k, s in snap.stores.items() if isinstance(s, Store))
        log.info("storage-config %s %s: keys %s", self.path, what, ", ".join(good) or "none")
        for s in snap.stores.values():
            if isinstance(s, BadStore):
                log.error("storage-config key %r unusable, models using it will fail to load: %s", s.key, s.reason)
