"""Kind: unit. Issue 18 §4: a load failure reaches an inference client as the model and the
kind of failure only; the full reason (store endpoint, bucket, key path) stays for logs and
`meshserve explain`. The activator runs against an in-memory stand-in for its Redis state."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from meshserve import failures
from meshserve.model import Copy, CopyState, Pod, copies_to_json
from meshserve.settings import Settings
from meshserve_placement.activator import Activator, LoadFailed

MODEL = "my-model__isvc-0123456789"
# What the loader reported for an S3 store it could not reach (the example).
S3_REASON = failures.tag(failures.STORAGE, "s3://b/models/my-model (store 's3', http://127.0.0.1:1): Could not connect to the endpoint URL")
LEAKS = ("s3://", "127.0.0.1", "b/models", "models/my-model", "store 's3'", "endpoint", "http://")


class _Pipeline:
    """The activator's first look: the copies read and the load asked for in one round trip."""

    def __init__(self, state: "_State"):
        self.state = state

    async def __aenter__(self) -> "_Pipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def hget(self, *a: Any) -> "_Pipeline":
        return self

    def xadd(self, *a: Any, **kw: Any) -> "_Pipeline":
        return self

    async def execute(self) -> list[Any]:
        return [copies_to_json(self.state.failed()), b"0-1"]


class _Redis:
    def __init__(self, state: "_State"):
        self.state = state

    async def xadd(self, *a: Any, **kw: Any) -> bytes:
        return b"0-1"

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self.state)


class _State:
    """Copies as placement leaves them: a failure stamped after the activator asked."""

    def __init__(self, pod: str, reason: str):
        self.r, self.pod_id, self.reason = _Redis(self), pod, reason

    def failed(self) -> dict[str, Copy]:
        return {self.pod_id: Copy(CopyState.FAILED, 0, time.time(), self.reason)}

    async def copies(self, model_id: str) -> dict[str, Copy]:
        return self.failed()

    async def pod(self, pod_id: str) -> Pod | None:
        return None


@pytest.mark.parametrize("pod,reason,kind_text", [
    ("pod-0", S3_REASON, "the model's storage could not be read"),
    ("pod-0", failures.tag(failures.LOAD, "cannot read /data/pvc/vol/corrupt.joblib: not a joblib file"), "the runtime could not load the model's files"),
    ("pod-0", failures.tag(failures.TIMEOUT, "load timed out after 90s"), "loading took longer than its timeout"),
    ("-", "no pod of runtime 'builtin' at http://10.0.0.7:8080 has room", "no runtime pod can hold it"),
    ("pod-0", "a reason from an older loader, s3://b/models/my-model", "the load failed"),
])
async def test_the_client_gets_the_model_and_the_kind_only(pod: str, reason: str, kind_text: str, caplog: pytest.LogCaptureFixture) -> None:
    act = Activator(Settings(cold_start_timeout_seconds=10.0), _State(pod, reason))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="meshserve.activator"), pytest.raises(LoadFailed) as e:
        await act.ensure_loaded(MODEL)
    msg = str(e.value)
    assert e.value.status == 503
    assert msg == f"model '{MODEL}' could not be loaded: {kind_text} (details: `meshserve explain {MODEL}`)"
    assert not [s for s in (*LEAKS, "corrupt.joblib", "/data/pvc", "10.0.0.7") if s in msg], msg
    # The operator still has it all, in the activator's log.
    assert reason in caplog.text


def test_tags_round_trip_and_unknown_heads_are_not_kinds() -> None:
    assert failures.kind_of(S3_REASON) == failures.STORAGE
    assert failures.kind_of("s3: something") == "" and failures.kind_of("plain reason") == ""
    assert failures.describe("plain reason", placement=True) == failures.CLIENT_TEXT[failures.PLACEMENT]


def test_a_model_refused_after_its_load_failed_everywhere_keeps_the_load_failure() -> None:
    """Kind: unit (pure). Once a model's load failed on every pod that can take it, placement
    refuses those pods for a while; the request waiting then is told the load failure's kind,
    as the requests before it were, not "no runtime pod can hold it"."""
    from meshserve.model import Copy, CopyState
    from meshserve_placement.decide import Decision, Verdict
    from meshserve_placement.decisions import _placement_reason

    excluded = Decision(MODEL, None, [], [Verdict("pod-0", "not-excluded", "a load failed here; excluded for 25s more"),
                                         Verdict("pod-1", "runtime", "runs mlserver-1.x; the model's runtime is meshserve-builtin")],
                        reason="no pod can take it: pod-0 a load failed here; pod-1 runs mlserver-1.x")
    copies = {"pod-0": Copy(CopyState.FAILED, 0, 10.0, failures.tag(failures.LOAD, "corrupt.joblib: not a joblib file")),
              "pod-1": Copy(CopyState.FAILED, 0, 5.0, failures.tag(failures.STORAGE, "s3 said no"))}
    reason = _placement_reason(excluded, copies)
    assert failures.client_message(MODEL, reason, placement=True) == (
        f"model '{MODEL}' could not be loaded: the runtime could not load the model's files (details: `meshserve explain {MODEL}`)")
    # Refused for room or runtime only: still placement's own words.
    full = Decision(MODEL, None, [], [Verdict("pod-0", "fits", "needs 2 GiB, 1 GiB free")], reason="no pod can take it: pod-0 needs 2 GiB")
    assert failures.describe(_placement_reason(full, copies), placement=True) == failures.CLIENT_TEXT[failures.PLACEMENT]
