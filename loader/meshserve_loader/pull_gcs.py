"""Pulling a model from Google Cloud Storage with the official client (google-cloud-storage).

A storage-config entry of type gcs holds a service account's key (`private_key` and
`client_email`, `token_uri` optional: ModelMesh's fields) or neither, for anonymous access to a
public bucket. `endpoint_url` (meshserve's addition) points the client at another endpoint, such
as an emulator. Synchronous: callers run `pull_gcs` in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from meshserve.extras import install_hint
from meshserve_loader.pull_objects import write_objects
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import Store

CHUNK = 1 << 20
# Every call is bounded: (connect, read) seconds.
TIMEOUT = (10, 60)
READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"


def gcs_client(store: Store):  # type: ignore[no-untyped-def]
    try:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        from google.oauth2 import service_account
    except ImportError as e:  # the `loader` extra: a runtime-only install lacks it
        raise StorageError(install_hint("loader", f"GCS store {store.key!r}", e.name)) from None
    if store.private_key:
        info = {"type": "service_account", "private_key": store.private_key, "client_email": store.client_email,
                "token_uri": store.token_uri or "https://oauth2.googleapis.com/token"}
        try:
            creds = service_account.Credentials.from_service_account_info(info, scopes=[READ_ONLY])
        except (ValueError, TypeError) as e:
            raise StorageError(f"storage-config key {store.key!r}: private_key is not a usable service account key ({e}); "
                               "copy private_key and client_email from the account's JSON key file") from None
    else:
        creds = AnonymousCredentials()
    # A project is never needed to read a bucket; naming one stops the client from asking the
    # environment (and the GCE metadata server) for it.
    return storage.Client(project=store.project_id or "meshserve", credentials=creds,
                          client_options={"api_endpoint": store.endpoint_url} if store.endpoint_url else None)


def gcs_objects(client, b, key: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """(name, size) of blob `key` of bucket `b`, else of every blob under `key/`."""
    blob = b.get_blob(key, timeout=TIMEOUT) if key else None
    if blob is not None:
        return [(blob.name, int(blob.size or 0))]
    prefix = f"{key}/" if key else ""
    return [(o.name, int(o.size or 0)) for o in client.list_blobs(b, prefix=prefix, timeout=TIMEOUT) if not o.name.endswith("/")]


def pull_gcs(
    store: Store, bucket: str, key: str, dest: Path, max_bytes: int, progress_min_bytes: int, sha256: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Download `key` (an object, else every object under `key/`) into the empty dir `dest`.
    Returns the model's path relative to `dest` ("" when it is the whole directory)."""
    try:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc
        from requests import RequestException
    except ImportError as e:  # the `loader` extra: a runtime-only install lacks it
        raise StorageError(install_hint("loader", f"GCS store {store.key or 'anonymous'!r}", e.name)) from None

    key = key.strip("/")
    if not bucket:
        raise StorageError(f"no bucket for {key!r}: set 'bucket' in storage-config key {store.key!r} or use a gs://bucket/path URI")
    what = f"gs://{bucket}/{key} (store {store.key or 'anonymous'!r}{', ' + store.endpoint_url if store.endpoint_url else ''})"
    client = gcs_client(store)
    b = client.bucket(bucket)
    try:
        objects = gcs_objects(client, b, key)

        def read(name: str) -> Iterator[bytes]:
            with b.blob(name).open("rb", chunk_size=CHUNK, timeout=TIMEOUT) as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return write_objects(what, key, objects, dest, max_bytes, progress_min_bytes, sha256, on_progress, read,
                             name_of=lambda k: f"gs://{bucket}/{k}")
    except gexc.NotFound as e:
        raise StorageError(f"{what}: not found ({e.message}); check the bucket name") from None
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise StorageError(f"{what}: {e.code} {e.message}; check the service account (private_key, client_email) in "
                           f"storage-config key {store.key!r} and its access to the bucket") from None
    except gexc.GoogleAPIError as e:
        raise StorageError(f"{what}: {e}") from None
    except aexc.GoogleAuthError as e:
        raise StorageError(f"{what}: authentication failed ({e}); check private_key, client_email and token_uri in "
                           f"storage-config key {store.key!r}") from None
    except RequestException as e:
        raise StorageError(f"{what}: {type(e).__name__}: {e}") from None
