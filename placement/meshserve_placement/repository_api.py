"""The bodies of the v2 model repository extension (Triton's): index, load, unload. Pure: each
returns what the body asks for or raises RepositoryBodyError, which the activator answers with
a 400 in v2 error JSON.

Checked against Triton's HTTP server (triton-inference-server/server, src/http_server.cc,
HandleRepositoryIndex and HandleRepositoryControl): an empty body means the defaults; a body
that is not JSON is refused ("failed to parse the request JSON buffer: …"); index takes
`ready` (a boolean: only models ready for inference); load takes `parameters` whose values are
strings (`config`, `file:<path>`); unload takes `parameters.unload_dependents` (a boolean).
Where Triton would act on something meshserve cannot (a load that overrides the model's config
or files), the answer is a 400 naming it, not a load that silently ignores it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable


class RepositoryBodyError(ValueError):
    pass


def read_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RepositoryBodyError("failed to parse the request JSON buffer: nested too deeply") from None
    except ValueError as e:
        raise RepositoryBodyError(f"failed to parse the request JSON buffer: {e}") from None
    if not isinstance(body, dict):
        raise RepositoryBodyError("the request body must be a JSON object")
    return body


def index_ready_only(body: dict[str, Any]) -> bool:
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise RepositoryBodyError(f"'ready' must be a boolean, got {json.dumps(ready)}")
    return ready


def check_load(body: dict[str, Any]) -> None:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise RepositoryBodyError("'parameters' must be a JSON object")
    check_load_parameters(params)


def check_load_parameters(names: Iterable[str]) -> None:
    """Every load parameter Triton has asks for something meshserve cannot do: each is refused."""
    for name in names:
        if name == "config" or name.startswith("file:"):
            raise RepositoryBodyError(
                f"parameter '{name}' is not supported: meshserve loads a model from the storage its InferenceService "
                "names, with its runtime's own config; change the InferenceService (meshserve apply) instead")
        raise RepositoryBodyError(f"unknown load parameter '{name}'; Triton's are 'config' and 'file:<path>'")


def check_unload(body: dict[str, Any]) -> None:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise RepositoryBodyError("'parameters' must be a JSON object")
    check_unload_dependents(params.get("unload_dependents", False))


def check_unload_dependents(value: object) -> None:
    """A boolean; either way there is nothing more to unload (meshserve has no ensembles)."""
    if not isinstance(value, bool):
        raise RepositoryBodyError(f"Unable to parse 'unload_dependents': must be a boolean, got {json.dumps(value, default=str)}")


def check_repository_name(name: str) -> None:
    if name:
        raise RepositoryBodyError("'repository_name' specification is not supported")
