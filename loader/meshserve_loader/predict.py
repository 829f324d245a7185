"""A model's size predicted from its stored files before any load (issue 19 §2): ModelMesh's
disk size x 1.25 (storage.from_disk), the same prediction the loader makes after the pull, so
placement can book a never-loaded model at its real size instead of UNKNOWN_MODEL_BYTES.

Registration (`meshserve apply`, `meshserve up`, the cluster's controller) calls it: local and
PVC paths are stat'ed, object stores listed through the pullers' own clients and listing
(pull_s3, pull_gcs, pull_azure) with the storage-config's credentials. Nothing is downloaded but PEFT's adapter_config.json, whose
`base_model_name_or_path` names an adapter's base (issue 17 item 1) when its spec does not, so
placement knows the base before the first load. A listing that fails or takes too long leaves
the prediction at 0 (placement books as before) and the base to the loader, with a log line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from meshserve.model import ModelSpec
from meshserve.registry import ADAPTER_CONFIG, FromStorage, base_from_adapter_config
from meshserve.settings import Settings
from meshserve.yamlfile import ConfigError
from meshserve_loader.fetch import Source, plan_source
from meshserve_loader.storage import StorageError, from_disk, predict_size, resolve_local
from meshserve_loader.storage_config import AnyStore, StorageConfigSource, parse_secret

log = logging.getLogger("meshserve.loader.predict")

# Listings at once, and how long one may take: registration waits for them.
CONCURRENCY = 16
TIMEOUT_S = 10.0
# PEFT's adapter_config.json is a few hundred bytes; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20


def listing(src: Source) -> tuple[list[tuple[str, int]], Callable[[str], bytes]]:
    """An object-store source's files as its puller lists them ((name, size)), and a reader of
    one of them by name, through the same client (blocking)."""
    assert src.store is not None
    key = src.key.strip("/")
    if src.kind == "s3":
        from meshserve_loader.pull_s3 import cached_client, s3_objects

        s3 = cached_client(src.store)
        return s3_objects(s3, src.bucket, key), lambda name: s3.get_object(Bucket=src.bucket, Key=name)["Body"].read()
    if src.kind == "gcs":
        from meshserve_loader.pull_gcs import TIMEOUT, gcs_client, gcs_objects

        client = gcs_client(src.store)
        b = client.bucket(src.bucket)
        return gcs_objects(client, b, key), lambda name: b.blob(name).download_as_bytes(timeout=TIMEOUT)
    if src.kind == "azure":
        from meshserve_loader.pull_azure import azure_client, azure_objects

        cc = azure_client(src.store).get_container_client(src.bucket)
        return azure_objects(cc, key), lambda name: cc.download_blob(name).readall()
    raise ValueError(f"no listing for a {src.kind} source")


@dataclass
class Predictor:
    pvc_root: Path
    stores: Mapping[str, AnyStore]
    config_error: str = ""
    model_roots: list[Path] = field(default_factory=list)
    # False where no PVC is mounted (the cluster's controller): local and PVC models are left
    # to the loader, which measures them after its pull.
    local: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> "Predictor":
        snap = StorageConfigSource(s.storage_config).current()
        return cls(s.pvc_root, snap.stores, snap.error, s.extra_model_roots)

    @classmethod
    def from_secret(cls, secret: Mapping[str, Any] | None) -> "Predictor":
        """For cluster mode's controller: the stores of the storage-config Secret it watches
        (credentials held in memory only, never written to Redis), object stores only."""
        return cls(Path("/nonexistent"), parse_secret(secret) if secret else {}, local=False)

    def read_one(self, spec: ModelSpec) -> FromStorage:
        """Blocking: one model's predicted bytes (0: no files found) and, unless its spec names
        a base, the base its adapter_config.json names, where the loader would find that file
        (beside a single file, or at the top of a folder). ConfigError for a broken one."""
        src = plan_source(spec.storage, self.stores, self.config_error)
        if src.kind == "local" and not self.local:
            return FromStorage()
        if src.kind == "local":
            path = resolve_local(dict(src.storage), self.pvc_root, self.model_roots)
            cfg = (path if path.is_dir() else path.parent) / ADAPTER_CONFIG
            base = _base(spec, cfg.stat().st_size, cfg.read_bytes, str(cfg)) if not spec.base and cfg.is_file() else ""
            return FromStorage(predict_size(path, spec.format), base, str(cfg) if base else "")
        if src.kind == "http":
            return FromStorage()  # nothing to list: the loader predicts and reads after the pull
        objects, read = listing(src)
        if not objects:
            raise StorageError(f"{src.shown}: no such object or prefix")
        key = src.key.strip("/")
        name = f"{key}/{ADAPTER_CONFIG}" if key else ADAPTER_CONFIG
        size = dict(objects).get(name)  # a single-object model is pulled alone: no config beside it
        shown = f"{src.shown.split('://')[0]}://{src.bucket}/{name}"
        base = _base(spec, size, lambda: read(name), shown) if not spec.base and size is not None else ""
        return FromStorage(from_disk(sum(n for _, n in objects)), base, shown if base else "")

    async def __call__(self, specs: list[ModelSpec]) -> dict[str, FromStorage]:
        """Model id -> what its files say, for the specs whose files could be listed. The others
        are named in one log line (a config of thousands whose files come later says so once).
        A broken adapter_config.json is the user's to fix: ConfigError (the first, by model)."""
        sem = asyncio.Semaphore(CONCURRENCY)
        failed: list[str] = []
        broken: dict[str, ConfigError] = {}

        async def one(spec: ModelSpec) -> tuple[str, FromStorage | None]:
            async with sem:
                try:
                    return spec.id, await asyncio.wait_for(asyncio.to_thread(self.read_one, spec), TIMEOUT_S)
                except ConfigError as e:
                    broken[spec.alias] = e
                except Exception as e:  # noqa: BLE001 - any failure means "not predicted", logged
                    failed.append(f"{spec.alias} ({f'took over {TIMEOUT_S:g}s' if isinstance(e, TimeoutError) else f'{type(e).__name__}: {e}'})")
                return spec.id, None

        got = {i: f for i, f in await asyncio.gather(*(one(s) for s in specs)) if f is not None}
        if broken:
            raise broken[min(broken)]
        if failed:
            log.warning("no size prediction for %d model(s) whose files could not be listed; placement books them at the "
                        "unknown-size default until their first load, and the loader reads an adapter's "
                        "adapter_config.json after its pull: %s%s", len(failed), "; ".join(failed[:3]),
                        f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
        return got


def _base(spec: ModelSpec, size: int, read: Callable[[], bytes], shown: str) -> str:
    """The base an adapter_config.json of `size` bytes names, parsed as the loader parses it."""
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(shown, 0, "", f"{size} bytes: too big for PEFT's adapter config (at most {MAX_CONFIG_BYTES} read)")
    try:
        text = read().decode()
    except UnicodeDecodeError as e:
        raise ConfigError(shown, 0, "", f"not UTF-8 text ({e.reason}): not PEFT's adapter config") from None
    return base_from_adapter_config(text, shown, spec.alias)
