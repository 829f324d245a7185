"""Kind: unit. Every process logs through a queue to one writer thread (meshserve/logs.py): the
lines that reach stderr still carry the model and trace of where they were logged, the
message as it was then, and the traceback; nothing queued is lost when the process ends."""

from __future__ import annotations

import json
import logging
from typing import Iterator

import pytest
from opentelemetry import trace

from meshserve import logs, tracing


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    r = logging.getLogger()
    before = (r.level, list(r.handlers))
    try:
        yield r
    finally:
        logs.stop()
        r.setLevel(before[0])
        r.handlers[:] = before[1]


def test_queued_lines_keep_their_context(root: logging.Logger, capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("test", json_lines=True)
    log = logging.getLogger("meshserve.test")
    args = ["before"]
    with tracing.handling("acme__isvc-0123456789"), trace.get_tracer(__name__).start_as_current_span("x") as span:
        log.info("placing %s", args)
        args.append("after")  # changed once logged: the line says what it was then
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.exception("load failed")
    trace_id = format(span.get_span_context().trace_id, "032x")
    logs.stop()  # what the process's exit does (atexit): the queue is written out
    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert [x["msg"] for x in lines] == ["placing ['before']", "load failed"]
    assert all(x["model"] == "acme__isvc-0123456789" for x in lines)
    if span.get_span_context().is_valid:  # a recording tracer: the line names the trace
        assert all(x["trace_id"] == trace_id for x in lines)
    assert "ZeroDivisionError: division by zero" in lines[1]["exc"]


def test_plain_lines_carry_the_traceback(root: logging.Logger, capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup("test")
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("meshserve.test").exception("lookup failed")
    logs.stop()
    err = capfd.readouterr().err
    assert "test ERROR lookup failed" in err and "KeyError: 'missing'" in err
