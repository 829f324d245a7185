"""From a model's `storage` (as the InferenceService writes it) to a local path the runtime can
load: plan where the files come from (pure), then pull them through the disk cache (I/O).

The storage forms understood, ModelMesh's and KServe's:
- `parameters: {type: pvc, name}` + `path`, or `storageUri: pvc://name/path` / `file:///abs`
- `key: <storage-config key>` + `path` (+ `parameters.bucket` to override the store's bucket);
  no key uses the storage-config's `default` entry
- `storageUri: s3://bucket/path` (credentials from `key` or `default`), `gs://bucket/path` (a gcs
  `key` or `default`, else anonymous) and `http(s)://...`
- a `key` naming a gcs store (+ `parameters.bucket`) or an azure store (+ `parameters.container`)
A `parameters.sha256` (hex, or `sha256:<hex>`) is checked for single-file models.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from opentelemetry import trace

from meshserve.settings import Settings
from meshserve_loader.diskcache import DiskCache
from meshserve_loader.pull_azure import pull_azure
from meshserve_loader.pull_gcs import pull_gcs
from meshserve_loader.pull_http import pull_http
from meshserve_loader.pull_s3 import pull_s3
from meshserve_loader.storage import StorageError, resolve_local
from meshserve_loader.storage_config import AnyStore, Store, StorageConfigError, StorageConfigSource, pick_store

log = logging.getLogger("meshserve.loader.fetch")


@dataclass(frozen=True)
class Source:
    kind: str  # "local", "s3", "gcs", "azure" or "http"
    storage: Mapping[str, Any] = field(default_factory=dict)  # local: the storage entry, resolved as before
    store: Store | None = None
    bucket: str = ""  # s3, gcs: the bucket; azure: the container
    key: str = ""
    url: str = ""
    sha256: str = ""

    @property
    def cache_id(self) -> str:
        # The digest is part of the identity: a changed digest must not reuse an old download.
        if self.kind in ("s3", "gcs"):
            assert self.store is not None
            return f"{self.kind}|{self.store.endpoint_url}|{self.bucket}|{self.key}|{self.sha256}"
        if self.kind == "azure":
            assert self.store is not None
            account = self.store.endpoint_url or self.store.account_name or self.store.connection_string.partition("AccountName=")[2].partition(";")[0]
            return f"azure|{account}|{self.bucket}|{self.key}|{self.sha256}"
        return f"http|{self.url}|{self.sha256}"

    @property
    def shown(self) -> str:
        """Where from, for logs (no credential)."""
        scheme = {"s3": "s3", "gcs": "gs", "azure": "azure"}.get(self.kind)
        return f"{scheme}://{self.bucket}/{self.key}" if scheme else self.url


def _relative_key(path: str) -> str:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts:
        raise StorageError(f"storage path {path!r} must be relative to its store, with no '..'")
    return str(p)


def plan_source(storage: Mapping[str, Any], stores: Mapping[str, AnyStore], config_error: str = "") -> Source:
    """Pure: where a model's files come from. Raises StorageError with what to fix.
    `config_error`: why the storage-config as a whole could not be read, if it could not."""
    params = storage.get("parameters") or {}
    sha = str(params.get("sha256") or "")
    uri = str(storage.get("uri") or "")
    key = str(storage.get("key") or "")
    try:
        if params.get("type") == "pvc" or uri.startswith(("pvc://", "file://")):
            return Source("local", storage=storage)
        if uri.startswith(("http://", "https://")):
            return Source("http", url=uri, sha256=sha)
        if uri.startswith("s3://"):
            u = urlsplit(uri)
            store = pick_store(stores, key or None, config_error)
            if store.type != "s3":
                raise StorageError(f"{uri}: storage-config key {store.key!r} is a {store.type} store, not s3")
            return Source("s3", store=store, bucket=u.netloc, key=_relative_key(u.path.lstrip("/")), sha256=sha)
        if uri.startswith("gs://"):
            u = urlsplit(uri)
            default = stores.get("default")
            if key:
                store = pick_store(stores, key, config_error)
                if store.type != "gcs":
                    raise StorageError(f"{uri}: storage-config key {store.key!r} is a {store.type} store, not gcs")
            elif default is not None and default.type == "gcs":
                store = pick_store(stores, None, config_error)  # a bad gcs default says why, not anonymous
            else:
                store = Store(key="", type="gcs")  # KServe reads gs:// URIs with no key anonymously (a public bucket)
            return Source("gcs", store=store, bucket=u.netloc, key=_relative_key(u.path.lstrip("/")), sha256=sha)
        if uri:
            raise StorageError(f"storageUri {uri!r}: scheme not supported; use s3://, gs://, http(s)://, pvc:// or file://")
        path = str(storage.get("path") or "")
        store = pick_store(stores, key or None, config_error)
        if store.type in ("s3", "gcs"):
            bucket = str(params.get("bucket") or store.bucket)
            return Source(store.type, store=store, bucket=bucket, key=_relative_key(path), sha256=sha)
        if store.type == "azure":
            container = str(params.get("container") or store.container)
            return Source("azure", store=store, bucket=container, key=_relative_key(path), sha256=sha)
        if store.type == "http":
            url = store.url.rstrip("/") + "/" + _relative_key(path)
            return Source("http", store=store, url=url, sha256=sha)
        return Source("local", storage={"parameters": {"type": "pvc", "name": store.name}, "path": path})
    except StorageConfigError as e:
        raise StorageError(str(e)) from None


@dataclass
class Fetcher:
    """`stores` is a fixed storage-config (tests); with `config` the storage-config is the one on
    disk at each pull (the loader's: an edited Secret applies to the next pull)."""

    pvc_root: Path
    stores: Mapping[str, AnyStore]
    cache: DiskCache
    max_model_bytes: int = 8 << 30
    progress_min_bytes: int = 32 << 20
    http_timeout: float = 600.0
    model_roots: list[Path] = field(default_factory=list)  # besides pvc_root, for file:// URIs
    downloads: int = 0  # pulls that went to the store (not served from the cache): for tests and stats
    config: StorageConfigSource | None = None

    def __post_init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self.cache.clean_staging()

    async def fetch(self, storage: Mapping[str, Any], on_progress: Callable[[int, int], None] | None = None) -> Path:
        """`on_progress(done, total)`: bytes pulled so far, after every chunk (from worker
        threads for S3, GCS and Azure, one call at a time); `done` can go back when a retried
        range or a restarted HTTP download takes back bytes. Not called for local models and
        cache hits."""
        config_error = ""
        if self.config is not None:
            # A stat or two when nothing changed (microseconds: inline, where a hand-off to an
            # executor thread cost a cold start more than the stats), a re-read of the small
            # file when the Secret did.
            snap = self.config.current()
            self.stores, config_error = snap.stores, snap.error
        src = plan_source(storage, self.stores, config_error)
        span = trace.get_current_span()  # the loader's `loader.pull`, when there is one
        span.set_attribute("meshserve.source", src.kind)
        if src.kind == "local":
            return resolve_local(dict(src.storage), self.pvc_root, self.model_roots)
        # One pull per source at a time: a second copy of the same model waits and hits the cache.
        lock = self._locks.setdefault(src.cache_id, asyncio.Lock())
        async with lock:
            hit = self.cache.lookup(src.cache_id)
            span.set_attribute("meshserve.cache_hit", hit is not None)
            if hit is not None:
                log.info("disk cache hit for %s", src.shown)
                return hit
            staged = self.cache.staging()
            try:
                if src.kind in ("s3", "gcs", "azure"):
                    assert src.store is not None
                    # The official clients are synchronous: a worker thread per pull.
                    pull = {"s3": pull_s3, "gcs": pull_gcs, "azure": pull_azure}[src.kind]
                    rel = await asyncio.get_running_loop().run_in_executor(
                        None, pull, src.store, src.bucket, src.key, staged, self.max_model_bytes, self.progress_min_bytes, src.sha256, on_progress
                    )
                else:
                    headers = dict(src.store.headers) if src.store else {}
                    rel = await pull_http(
                        src.url, staged, headers, self.max_model_bytes, self.progress_min_bytes, src.sha256, self.http_timeout, on_progress
                    )
                self.downloads += 1
                return self.cache.commit(src.cache_id, staged, rel)
            finally:
                if staged.exists():
                    shutil.rmtree(staged, ignore_errors=True)


def make_fetcher(settings: Settings, pod_id: str) -> Fetcher:
    # The storage-config is re-read at each pull when its file (or mounted Secret) changed, so a
    # Secret edited in Kubernetes applies without a restart. A bad entry fails only the models
    # naming it, and an unreadable storage-config only the models that need it: local/pvc and
    # plain http models always load. Read once here so problems show in the log at start.
    config = StorageConfigSource(settings.storage_config)
    snap = config.current()
    return Fetcher(
        pvc_root=settings.pvc_root,
        stores=snap.stores,
        cache=DiskCache(settings.pod_cache_dir(pod_id), settings.cache_max_bytes),
        max_model_bytes=settings.max_model_bytes,
        progress_min_bytes=settings.pull_progress_bytes,
        model_roots=settings.extra_model_roots,
        config=config,
    )
