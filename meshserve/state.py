"""Deprecated import path, kept while placement, xds and the loader move to meshserve.store
(issue 15): import from meshserve.store.{keys,messages,state,ops} instead."""

from __future__ import annotations

import time
from typing import Any

from meshserve.store.keys import *  # noqa: F401,F403
from meshserve.store.keys import LOAD_REQUESTS, STREAM_MAXLEN
from meshserve.store.messages import (  # noqa: F401
    KIND_ALIAS, KIND_ALL, KIND_MODEL, KIND_PLACEMENT, KIND_POD, KIND_RULE, KIND_TRANSITION, LOAD_OPS, LoadRequest,
)
from meshserve.store.state import NotLeader, Snapshot, State, parse_runtimes, runtime_json  # noqa: F401


def load_request(model_id: str, op: str = "load", now: float | None = None, **extra: str) -> dict[str, str]:
    why = extra.pop("why", "")
    return LoadRequest(model_id, op, time.time() if now is None else now, why, extra).encode()


def load_request_command(model_id: str, op: str, now: float, **extra: str) -> list[Any]:
    fields = load_request(model_id, op, now, **extra)
    return ["XADD", LOAD_REQUESTS, "MAXLEN", "~", STREAM_MAXLEN, "*", *(x for kv in fields.items() for x in kv)]
