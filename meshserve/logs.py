"""Logging for every process: plain lines for people, or JSON lines (MESHSERVE_LOG_JSON=true)."""

from __future__ import annotations

import json
import logging
import os
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
        return json.dumps(doc)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [f"{k}={getattr(record, k)}" for k in ("model", "trace_id") if getattr(record, k, None)]
        return f"{line} [{' '.join(tags)}]" if tags else line


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

    # On the handler, not the logger: records from every child logger pass through it.
    handler.addFilter(TraceLogFilter())
    setup_tracing(f"meshserve-{component.split('-')[0]}")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
