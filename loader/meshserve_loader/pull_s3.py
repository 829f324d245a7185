"""Pulling a model from an S3-compatible store (AWS S3, MinIO, Ceph...) with boto3.

A storage path names either one object or a prefix (a model directory, as MLServer and Triton
models are). boto3 is synchronous: callers run `pull_s3` in a thread.

Each object comes down through boto3's transfer manager (s3transfer): an object larger than
PART_BYTES is fetched as concurrent ranged GETs of PART_BYTES, CONCURRENCY at a time, each range
retried alone. One GET stream is limited by one connection's window and one server thread;
several fill the link (docs/benchmarks.md, "S3 pull"). The defaults are s3transfer's own (those
of `aws s3 cp`). A model's sha256, when it has one, is computed as the ranges land (_Target).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from meshserve.extras import install_hint
from meshserve_loader.pull_objects import write_objects
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import Store

# Parts of this size, this many in flight; objects up to PART_BYTES are one plain GET.
PART_BYTES = 8 << 20
CONCURRENCY = 10


_ca_lock = threading.Lock()


def ca_bundle_file(pem: str) -> str:
    """A file holding `pem`, for botocore's `verify=` (it takes a path, not the text). Named by
    the PEM's digest, so each pull of the same entry reuses one file and a changed certificate
    gets a new one; written whole and renamed into place, so a concurrent pull never reads half
    of it. In the temp dir: the loader's root filesystem is read-only, /tmp is its emptyDir. A
    CA certificate is public, so no secret lands on disk."""
    digest = hashlib.sha256(pem.encode()).hexdigest()[:32]
    d = Path(tempfile.gettempdir()) / "meshserve-ca"
    path = d / f"{digest}.pem"
    with _ca_lock:
        if not path.exists():
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(pem if pem.endswith("\n") else pem + "\n")
            os.replace(tmp, path)
    return str(path)


def s3_client(store: Store):  # type: ignore[no-untyped-def]
    try:
        import boto3
        from botocore.config import Config
    except ModuleNotFoundError as e:  # the `loader` extra: a runtime-only install lacks it
        raise StorageError(install_hint("loader", f"S3 store {store.key or 'default'!r}", e.name)) from None

    # Path-style addressing: MinIO and other self-hosted stores don't do virtual-host buckets.
    cfg = Config(
        s3={"addressing_style": "path"} if store.endpoint_url else {},
        retries={"max_attempts": 3, "mode": "standard"},
        # One connection per range in flight, for a few pulls at once through this one kept
        # client (the loader runs MESHSERVE_MAX_CONCURRENT_LOADS, 2 by default); opened as used.
        max_pool_connections=4 * CONCURRENCY,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=store.endpoint_url or None,
        aws_access_key_id=store.access_key_id or None,
        aws_secret_access_key=store.secret_access_key or None,
        region_name=store.region or "us-east-1",
        # A private endpoint's CA (ModelMesh's `certificate`): trusted instead of the system CAs
        # for this store only, as ModelMesh's CustomCABundle does.
        verify=ca_bundle_file(store.certificate) if store.certificate else None,
        config=cfg,
    )


class _Target:
    """The file s3transfer downloads into: seekable, so each range is written at its offset as
    it arrives (its one I/O thread calls seek, then write). When a digest is to be checked, the
    hash follows the contiguous prefix as it grows: bytes written right at its end are hashed
    from memory, and a range that arrived early is read back from the page cache once the gap
    before it fills. So the sha256 is done when the download is, not in a second pass over the
    file, and nothing is held in memory for it. (s3transfer's in-order mode for unseekable
    targets holds a window of early ranges and measured ~20% slower here.)"""

    def __init__(self, path: Path, hashed: bool):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # read back to hash early ranges
        self.pos = 0
        self.sha = hashlib.sha256() if hashed else None
        self.hashed_to = 0  # bytes [0, hashed_to) are in the hash
        self.early: list[tuple[int, int]] = []  # heap of (offset, end) written past hashed_to

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        else:
            raise io.UnsupportedOperation("seek from the end")
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        off = self.pos
        while view:  # a regular file takes it all at once; a short write is carried on
            n = os.pwrite(self.fd, view, off)
            view, off = view[n:], off + n
        if self.sha is not None:
            self._hash(self.pos, data)
        self.pos += len(data)
        return len(data)

    def _hash(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if offset <= self.hashed_to < end:
            # (offset < hashed_to: a retried range rewriting bytes already hashed, same bytes)
            self.sha.update(memoryview(data)[self.hashed_to - offset :])  # type: ignore[union-attr]
            self.hashed_to = end
        elif offset > self.hashed_to:
            heapq.heappush(self.early, (offset, end))
        while self.early and self.early[0][0] <= self.hashed_to:
            _, e = heapq.heappop(self.early)
            self._hash_from_disk(e)

    def _hash_from_disk(self, end: int) -> None:
        while self.hashed_to < end:
            chunk = os.pread(self.fd, min(end - self.hashed_to, 8 << 20), self.hashed_to)
            if not chunk:
                raise StorageError("the downloaded file is shorter than what was written to it")
            self.sha.update(chunk)  # type: ignore[union-attr]
            self.hashed_to += len(chunk)

    def digest(self) -> str:
        """The file's sha256 (hex), "" when not hashing."""
        if self.sha is None:
            return ""
        self._hash_from_disk(os.fstat(self.fd).st_size)  # nothing left when all went as expected
        return self.sha.hexdigest()

    def close(self) -> None:
        os.close(self.fd)


_clients: dict[tuple[str, ...], object] = {}
_clients_lock = threading.Lock()
MAX_CLIENTS = 8


def cached_client(store: Store):  # type: ignore[no-untyped-def]
    """One client per endpoint and credentials, kept across pulls: making one costs ~0.1 s
    (boto3 reads its service models), and a kept one keeps its pooled connections. boto3
    clients are thread-safe. An edited storage-config entry (new keys, a new certificate) is
    another key here, so it gets a new client; the oldest are dropped past MAX_CLIENTS."""
    key = (store.endpoint_url, store.access_key_id, store.secret_access_key, store.region, store.certificate)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = s3_client(store)
            while len(_clients) > MAX_CLIENTS:
                del _clients[next(iter(_clients))]
        return client


def _describe(store: Store, bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key} (store {store.key!r}{', ' + store.endpoint_url if store.endpoint_url else ''})"


def pull_s3(
    store: Store, bucket: str, key: str, dest: Path, max_bytes: int, progress_min_bytes: int, sha256: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Download `key` (an object, else every object under `key/`) into the empty dir `dest`.
    Returns the model's path relative to `dest` ("" when it is the whole directory)."""
    try:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError, SSLError
        import s3transfer.exceptions as s3x
    except ModuleNotFoundError as e:  # the `loader` extra: a runtime-only install lacks it
        raise StorageError(install_hint("loader", f"S3 store {store.key or 'default'!r}", e.name)) from None

    RetriesExceededError = s3x.RetriesExceededError
    # s3transfer checks that an object did not change mid-download (its ETag) only from 0.11 on;
    # with an older one there is nothing to catch.
    changed_mid_pull: tuple[type[Exception], ...] = tuple(c for c in (getattr(s3x, "S3DownloadFailedError", None),) if c)
    key = key.strip("/")
    if not bucket:
        raise StorageError(f"no bucket for {key!r}: set 'bucket' in storage-config key {store.key!r} or use an s3://bucket/path URI")
    what = _describe(store, bucket, key)
    client = cached_client(store)
    # Threads, never the CRT client: the byte counts below come from s3transfer's callbacks.
    transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=CONCURRENCY,
                              use_threads=True, preferred_transfer_client="classic")

    def download(k: str, target: Path, count: Callable[[int], None]) -> str:
        # `count` raising (the size limit) fails the transfer; the manager cancels the other
        # ranges and waits for its threads before this returns, so nothing writes into the
        # staging dir after the caller removes it.
        out = _Target(target, hashed=bool(sha256))
        try:
            client.download_fileobj(bucket, k, out, Callback=count, Config=transfer)
            return out.digest()
        finally:
            out.close()

    try:
        return write_objects(
            what, key, s3_objects(client, bucket, key), dest, max_bytes, progress_min_bytes, sha256, on_progress,
            read=None, name_of=lambda k: f"s3://{bucket}/{k}", download=download,
        )
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        hint = {
            "AccessDenied": "check the credentials in the storage-config",
            "InvalidAccessKeyId": "check access_key_id in the storage-config",
            "SignatureDoesNotMatch": "check secret_access_key in the storage-config",
            "NoSuchBucket": "check the bucket name",
        }.get(code, "")
        raise StorageError(f"{what}: {code or e}{'; ' + hint if hint else ''}") from None
    except SSLError as e:
        hint = (f"set 'certificate' in storage-config key {store.key!r} to the PEM CA bundle that signed the endpoint's certificate"
                if not store.certificate else f"the 'certificate' in storage-config key {store.key!r} did not verify the endpoint: is it the CA that signed it?")
        raise StorageError(f"{what}: TLS certificate verification failed ({e}); {hint}") from None
    except changed_mid_pull as e:
        # The object was replaced while its ranges were being fetched (its ETag changed).
        raise StorageError(f"{what}: {e}; the object changed during the pull, load the model again") from None
    except RetriesExceededError as e:
        raise StorageError(f"{what}: the connection kept failing ({e.last_exception}); check the endpoint and the network") from None
    except BotoCoreError as e:
        raise StorageError(f"{what}: {e}") from None


def s3_objects(client, bucket: str, key: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """(key, size) of object `key`, else of every object under `key/` (placeholders skipped)."""
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
