"""Why a model failed to load, in two forms: the full reason for operators (logs, load events,
`meshserve explain`), and what an inference client may be told, the model and the kind of
failure only. A full reason names store endpoints, buckets, object keys and file paths, which are
not the client's to see (issue 18 §4).

The loader tags each failure's reason with its kind (`tag`): "<kind>: <detail>". Placement's
own failures (no pod can hold the model) come on the `-` pseudo-copy and are untagged.
"""

from __future__ import annotations

STORAGE = "storage"
TIMEOUT = "timeout"
LOAD = "load"
RUNTIME = "runtime"
INTERNAL = "internal"
PLACEMENT = "placement"

# What a client reads after "model 'x' could not be loaded: ".
CLIENT_TEXT: dict[str, str] = {
    STORAGE: "the model's storage could not be read",
    TIMEOUT: "loading took longer than its timeout",
    LOAD: "the runtime could not load the model's files",
    RUNTIME: "the runtime pod did not answer",
    INTERNAL: "the loader failed unexpectedly",
    PLACEMENT: "no runtime pod can hold it",
}
UNKNOWN_TEXT = "the load failed"


def tag(kind: str, detail: str) -> str:
    """A full reason that says its kind first, for `kind_of` to read back."""
    assert kind in CLIENT_TEXT, kind
    return f"{kind}: {detail}"


def kind_of(reason: str) -> str:
    """The kind a `tag`ged reason carries; "" for an untagged one."""
    head, sep, _ = reason.partition(": ")
    return head if sep and head in CLIENT_TEXT else ""


def describe(reason: str, placement: bool = False) -> str:
    """The kind of failure in a client's words. Placement's own failure says no pod can hold the
    model, unless its reason is tagged with the load failure that made it so (a model whose
    load failed on every pod that could take it is refused there for a while)."""
    return CLIENT_TEXT.get(kind_of(reason) or (PLACEMENT if placement else ""), UNKNOWN_TEXT)


def client_message(model: str, reason: str, placement: bool = False) -> str:
    """What an inference client is told about a failed load: the model, the kind of failure and
    where the details are, never the reason itself."""
    return f"model '{model}' could not be loaded: {describe(reason, placement)} (details: `meshserve explain {model}`)"
