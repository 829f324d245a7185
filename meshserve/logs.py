"""Logging for every process: plain lines for people, or JSON lines (MESHSERVE_LOG_JSON=true)."""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import os
import queue
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("model", "pod", "trace_id"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted where it was logged (_Queued)
            doc["exc"] = record.exc_text
        return json.dumps(doc)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [f"{k}={getattr(record, k)}" for k in ("model", "trace_id") if getattr(record, k, None)]
        return f"{line} [{' '.join(tags)}]" if tags else line


class _Queued(logging.handlers.QueueHandler):
    """Hands records to the writing thread: the message merged with its args and the traceback
    made text here, where they are current, and laid out by the writer's formatter as before."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = logging.Formatter()
_listener: "logging.handlers.QueueListener | None" = None


def stop() -> None:
    """Write out every queued record and end the writer thread: at the process's exit (before
    logging's own flush, atexit running last-registered first), or before a new `setup`."""
    global _listener
    if _listener is not None:
        listener, _listener = _listener, None
        listener.stop()


atexit.register(stop)


def setup(component: str, json_lines: bool = False, level: int | None = None) -> None:
    """`level`: else MESHSERVE_LOG_LEVEL (Settings.log_level, checked when settings are read)."""
    if level is None:
        level = getattr(logging, os.environ.get("MESHSERVE_LOG_LEVEL", "info").upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = _PlainFormatter(f"%(asctime)s {component} %(levelname)s %(message)s", "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    from meshserve.tracing import TraceLogFilter, setup as setup_tracing

    setup_tracing(f"meshserve-{component.split('-')[0]}")
    # The process's own threads only queue a record; one thread writes them out. A write to
    # stderr (a pipe to `meshserve up` or the container runtime) wakes the reader, which on a
    # 2-core pod takes the CPU from the writer: a fifth of the leader's time per cold-start
    # decision was the "placing ..." line, waiting in that write (py-spy, docs/design/placement.md).
    global _listener
    stop()  # set up again (tests): the last writer finishes its queue and goes
    records: "queue.SimpleQueue[logging.LogRecord]" = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    _listener.start()
    queued = _Queued(records)
    # On the handler, not the logger: records from every child logger pass through it. On the
    # queueing one, which runs in the logging thread, where the span and model are current.
    queued.addFilter(TraceLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [queued]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
