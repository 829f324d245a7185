"""Pulling a model from an S3-compatible store (AWS S3, MinIO, Ceph...) with boto3.

A storage path names either one object or a prefix (a model directory, as MLServer and Triton
models are). boto3 is synchronous: callers run `pull_s3` in a thread.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Callable

from meshserve_loader.sink import Budget, Progress, Sink
from meshserve_loader.storage import StorageError, safe_join
from meshserve_loader.storage_config import Store

CHUNK = 1 << 20


def s3_client(store: Store):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    # Path-style addressing: MinIO and other self-hosted stores don't do virtual-host buckets.
    cfg = Config(
        s3={"addressing_style": "path"} if store.endpoint_url else {},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=store.endpoint_url or None,
        aws_access_key_id=store.access_key_id or None,
        aws_secret_access_key=store.secret_access_key or None,
        region_name=store.region or "us-east-1",
        config=cfg,
    )


def _describe(store: Store, bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key} (store {store.key!r}{', ' + store.endpoint_url if store.endpoint_url else ''})"


def pull_s3(
    store: Store, bucket: str, key: str, dest: Path, max_bytes: int, progress_min_bytes: int, sha256: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Download `key` (an object, else every object under `key/`) into the empty dir `dest`.
    Returns the model's path relative to `dest` ("" when it is the whole directory)."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = key.strip("/")
    if not bucket:
        raise StorageError(f"no bucket for {key!r}: set 'bucket' in storage-config key {store.key!r} or use an s3://bucket/path URI")
    what = _describe(store, bucket, key)
    client = s3_client(store)
    budget = Budget(max_bytes)
    try:
        objects = _objects(client, bucket, key)
        if not objects:
            raise StorageError(f"{what}: no such object or prefix")
        total = sum(size for _, size in objects)
        if total > max_bytes:
            raise StorageError(f"{what}: model is {total} bytes, over the limit of {max_bytes} (MESHSERVE_MAX_MODEL_BYTES)")
        single = len(objects) == 1 and objects[0][0] == key
        if sha256 and not single:
            raise StorageError(f"{what}: a sha256 digest can only be checked for a single-file model, this is a prefix")
        progress = Progress(what, total, progress_min_bytes, on_progress)
        for obj_key, _ in objects:
            rel = posixpath.basename(obj_key) if single else obj_key[len(key) + 1 :] if key else obj_key
            target = safe_join(dest, rel)  # an object name with '..' must not write outside dest
            target.parent.mkdir(parents=True, exist_ok=True)
            sink = Sink(target, f"s3://{bucket}/{obj_key}", budget, progress)
            try:
                body = client.get_object(Bucket=bucket, Key=obj_key)["Body"]
                for chunk in body.iter_chunks(CHUNK):
                    sink.write(chunk)
            finally:
                sink.close()
            sink.verify(sha256 if single else "")
        return posixpath.basename(key) if single else ""
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        hint = {
            "AccessDenied": "check the credentials in the storage-config",
            "InvalidAccessKeyId": "check access_key_id in the storage-config",
            "SignatureDoesNotMatch": "check secret_access_key in the storage-config",
            "NoSuchBucket": "check the bucket name",
        }.get(code, "")
        raise StorageError(f"{what}: {code or e}{'; ' + hint if hint else ''}") from None
    except BotoCoreError as e:
        raise StorageError(f"{what}: {e}") from None


def _objects(client, bucket: str, key: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    from botocore.exceptions import ClientError

    if key:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            return [(key, int(head["ContentLength"]))]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
    prefix = f"{key}/" if key else ""
    out: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # "directory" placeholder objects
                out.append((obj["Key"], int(obj["Size"])))
    return out
