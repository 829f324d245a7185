"""Pulling a model from Azure Blob Storage with the official client (azure-storage-blob).

A storage-config entry of type azure names `account_name` and `container` and authenticates with
a `connection_string`, a service principal (`client_id`, `client_secret`, `tenant_id`, through
azure-identity) or nothing (a public container): ModelMesh's fields and order of preference.
`endpoint_url` (meshserve's addition) is the account URL when it is not
https://<account_name>.blob.core.windows.net (Azurite, sovereign clouds). Synchronous: callers
run `pull_azure` in a thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from meshserve.extras import install_hint
from meshserve_loader.pull_objects import write_objects
from meshserve_loader.storage import StorageError
from meshserve_loader.storage_config import Store

# Every call is bounded; the client's own retries (3) cover a dropped connection.
CLIENT_KW = {"connection_timeout": 10, "read_timeout": 60, "retry_total": 3}


def azure_client(store: Store):  # type: ignore[no-untyped-def]
    try:
        from azure.storage.blob import BlobServiceClient
    except ImportError as e:  # the `loader` extra: a runtime-only install lacks it
        raise StorageError(install_hint("loader", f"Azure store {store.key!r}", e.name)) from None
    if store.connection_string:
        try:
            return BlobServiceClient.from_connection_string(store.connection_string, **CLIENT_KW)
        except ValueError as e:
            raise StorageError(f"storage-config key {store.key!r}: connection_string is not usable ({e}); "
                               "copy it from the storage account's Access keys page") from None
    url = store.endpoint_url or f"https://{store.account_name}.blob.core.windows.net"
    credential = None
    if store.client_id:
        try:
            from azure.identity import ClientSecretCredential
        except ImportError as e:
            raise StorageError(install_hint("loader", f"Azure store {store.key!r} (a service principal)", e.name)) from None
        credential = ClientSecretCredential(store.tenant_id, store.client_id, store.client_secret)
    return BlobServiceClient(url, credential=credential, **CLIENT_KW)


def azure_objects(cc, key: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """(name, size) of blob `key` in container client `cc`, else of every blob under `key/`."""
    from azure.core import exceptions as azexc

    if key:
        try:
            return [(key, int(cc.get_blob_client(key).get_blob_properties().size))]
        except azexc.ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise
    prefix = f"{key}/" if key else ""
    return [(b.name, int(b.size)) for b in cc.list_blobs(name_starts_with=prefix or None) if not b.name.endswith("/")]


def pull_azure(
    store: Store, container: str, key: str, dest: Path, max_bytes: int, progress_min_bytes: int, sha256: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> str:
    """Download blob `key` (else every blob under `key/`) of `container` into the empty dir
    `dest`. Returns the model's path relative to `dest` ("" when it is the whole directory)."""
    try:
        from azure.core import exceptions as azexc
    except ImportError as e:  # the `loader` extra: a runtime-only install lacks it
        raise StorageError(install_hint("loader", f"Azure store {store.key!r}", e.name)) from None

    key = key.strip("/")
    if not container:
        raise StorageError(f"no container for {key!r}: set 'container' in storage-config key {store.key!r}")
    account = store.account_name or store.endpoint_url or "the connection string's account"
    what = f"azure container {container!r} blob {key!r} (store {store.key!r}, account {account})"
    svc = azure_client(store)
    cc = svc.get_container_client(container)
    try:
        objects = azure_objects(cc, key)
        return write_objects(what, key, objects, dest, max_bytes, progress_min_bytes, sha256, on_progress,
                             read=lambda name: cc.download_blob(name, max_concurrency=1).chunks(),
                             name_of=lambda name: f"azure://{container}/{name}")
    except azexc.ResourceNotFoundError as e:
        raise StorageError(f"{what}: {_code(e) or 'not found'}; check the container name and account") from None
    except (azexc.ClientAuthenticationError, azexc.HttpResponseError) as e:
        if e.status_code in (401, 403) or isinstance(e, azexc.ClientAuthenticationError):
            hint = (f"check connection_string or the service principal (client_id, client_secret, tenant_id) in storage-config key "
                    f"{store.key!r}, and its access to the container" if store.connection_string or store.client_id
                    else "a container without public access needs a connection_string or a service principal")
            raise StorageError(f"{what}: HTTP {e.status_code} {_code(e) or 'authentication failed'}; {hint}") from None
        raise StorageError(f"{what}: HTTP {e.status_code} {_code(e) or e.reason}") from None
    except azexc.AzureError as e:
        raise StorageError(f"{what}: {type(e).__name__}: {getattr(e, 'message', None) or e}") from None


def _code(e: Exception) -> str:
    """The service's error code as it names it (AuthorizationFailure, ContainerNotFound...)."""
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")
