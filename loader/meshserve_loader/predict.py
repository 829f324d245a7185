"""A model's size predicted from its stored files before any load (issue 19 §2): ModelMesh's
disk size x 1.25 (storage.from_disk), the same prediction the loader makes after the pull, so
placement can book a never-loaded model at its real size instead of UNKNOWN_MODEL_BYTES.

Registration (`meshserve apply`, `meshserve up`) calls it: local and PVC paths are stat'ed, object
stores listed through the pullers' own clients and listing (pull_s3, pull_gcs, pull_azure) with
the storage-config's credentials. Nothing is downloaded. A listing that fails or takes too long
leaves the prediction at 0 (placement books as before) with a log line saying why.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from meshserve.model import ModelSpec
from meshserve.settings import Settings
from meshserve_loader.fetch import Source, plan_source
from meshserve_loader.storage import StorageError, from_disk, predict_size, resolve_local
from meshserve_loader.storage_config import AnyStore, StorageConfigSource

log = logging.getLogger("meshserve.loader.predict")

# Listings at once, and how long one may take: registration waits for them.
CONCURRENCY = 16
TIMEOUT_S = 10.0


def listed_bytes(src: Source) -> int:
    """The bytes of an object-store source's files, as its puller would list them (blocking)."""
    assert src.store is not None
    key = src.key.strip("/")
    if src.kind == "s3":
        from meshserve_loader.pull_s3 import cached_client, s3_objects

        objects = s3_objects(cached_client(src.store), src.bucket, key)
    elif src.kind == "gcs":
        from meshserve_loader.pull_gcs import gcs_client, gcs_objects

        client = gcs_client(src.store)
        objects = gcs_objects(client, client.bucket(src.bucket), key)
    elif src.kind == "azure":
        from meshserve_loader.pull_azure import azure_client, azure_objects

        objects = azure_objects(azure_client(src.store).get_container_client(src.bucket), key)
    else:
        raise ValueError(f"no listing for a {src.kind} source")
    return sum(size for _, size in objects)


@dataclass
class Predictor:
    pvc_root: Path
    stores: Mapping[str, AnyStore]
    config_error: str = ""
    model_roots: list[Path] = field(default_factory=list)

    @classmethod
    def from_settings(cls, s: Settings) -> "Predictor":
        snap = StorageConfigSource(s.storage_config).current()
        return cls(s.pvc_root, snap.stores, snap.error, s.extra_model_roots)

    def predict_one(self, storage: Mapping[str, Any], fmt: str) -> int:
        """Blocking: the predicted bytes of one model's stored files (0: none found)."""
        src = plan_source(storage, self.stores, self.config_error)
        if src.kind == "local":
            return predict_size(resolve_local(dict(src.storage), self.pvc_root, self.model_roots), fmt)
        if src.kind == "http":
            return 0  # nothing to list: the loader predicts after the pull
        disk = listed_bytes(src)
        if not disk:
            raise StorageError(f"{src.shown}: no such object or prefix")
        return from_disk(disk)

    async def __call__(self, specs: list[ModelSpec]) -> dict[str, int]:
        """Model id -> predicted bytes, for the specs whose files could be listed. The others are
        named in one log line (a config of thousands whose files come later says so once)."""
        sem = asyncio.Semaphore(CONCURRENCY)
        failed: list[str] = []

        async def one(spec: ModelSpec) -> tuple[str, int]:
            async with sem:
                try:
                    return spec.id, await asyncio.wait_for(asyncio.to_thread(self.predict_one, spec.storage, spec.format), TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - any failure means "not predicted", logged
                    failed.append(f"{spec.alias} ({f'took over {TIMEOUT_S:g}s' if isinstance(e, TimeoutError) else f'{type(e).__name__}: {e}'})")
                    return spec.id, 0

        got = {i: n for i, n in await asyncio.gather(*(one(s) for s in specs)) if n > 0}
        if failed:
            log.warning("no size prediction for %d model(s) whose files could not be listed; placement books them at the "
                        "unknown-size default until their first load: %s%s", len(failed), "; ".join(failed[:3]),
                        f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
        return got
