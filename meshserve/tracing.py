"""Traces (OpenTelemetry): one setup per process, and trace context carried through Redis.

The cache-miss path crosses processes through Redis streams (activator -> placement leader ->
loader), so the W3C `traceparent` rides along as a stream field: `inject(fields)` when writing,
`extract(fields)` when reading. Export goes to OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, the standard OpenTelemetry variables; otherwise spans
are made but not exported. Tests pass their own (in-memory) exporter.
"""

from __future__ import annotations

import contextvars
import logging
import os
from typing import Any, Mapping, MutableMapping

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

TRACEPARENT = "traceparent"
# The model a log line is about, set where a request or order for a model is handled.
current_model: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_model", default="")
_provider: TracerProvider | None = None


def setup(service: str, exporter: SpanExporter | None = None, *, simple: bool = False) -> TracerProvider:
    """Make this process's tracer provider. Called again with an exporter (tests), it replaces it."""
    global _provider
    if _provider is not None and exporter is None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is None and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter))
    _provider = provider
    return provider


def tracer(name: str) -> trace.Tracer:
    return (_provider or setup("meshserve")).get_tracer(name)


def inject(fields: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the current trace context to a Redis stream entry (or any string map)."""
    propagate.inject(fields)
    return fields


def extract(fields: Mapping[Any, Any]) -> context.Context:
    """The trace context a Redis stream entry carried (bytes or str keys), or an empty one."""
    carrier = {}
    for k, v in fields.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        if key in (TRACEPARENT, "tracestate"):
            carrier[key] = v.decode() if isinstance(v, bytes) else str(v)
    return propagate.extract(carrier)


class TraceLogFilter(logging.Filter):
    """Puts trace_id and model on every log record made inside a span or a model's handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span()
        ctx = span.get_span_context()
        if ctx.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(ctx.trace_id, "032x")
        model = current_model.get()
        if model and not hasattr(record, "model"):
            record.model = model
        return True
