"""Traces (OpenTelemetry): one setup per process, and trace context carried through Redis.

The cache-miss path crosses processes through Redis streams (activator -> placement leader ->
loader), so the W3C `traceparent` rides along as a stream field: `inject(fields)` when writing,
`extract(fields)` when reading. Export goes to OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, the standard OpenTelemetry variables; otherwise spans
are made but not exported. Tests pass their own (in-memory) exporter.

Spans exist only off the data path (loaded models are routed by Envoy straight to pods):

    activator.request          the activator took a request for a model no pod holds (SERVER)
      activator.hold           ... and holds it until a copy is loaded; its context rides on ms:loadreq
        placement.decide       the leader's decision (child of the loadreq entry's context); the
                               load order on ms:orders:<pod> carries this span's context
          loader.pull          the pod's loader fetches the model's files (child of the order)
          loader.load          ... and loads them into its runtime; the result on ms:events
                               carries the order's context back to the leader
      activator.forward        the held request goes to the pod that loaded it (CLIENT)
    control.apply / control.promote / control.rollback     operator actions (CLI, `up`)

Every span about a model has `meshserve.model`; spans about a pod have `meshserve.pod`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
ATTR_MODEL = "meshserve.model"
ATTR_POD = "meshserve.pod"
# The model a log line is about, set where a request or order for a model is handled.
current_model: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_model", default="")
_provider: TracerProvider | None = None
# Benchmarks (bench/hops.py): every process appends its spans as JSON lines to <this>.<pid>.
TRACE_FILE_ENV = "MESHSERVE_TRACE_FILE"


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines in a local file: name, trace id, start/end (ns), attributes. For
    timing the cold path's hops on one machine without a collector."""

    def __init__(self, path: str):
        self.path = path

    def export(self, spans: Sequence[Any]) -> Any:
        import json

        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps({"trace": format(s.context.trace_id, "032x"), "name": s.name, "start": s.start_time, "end": s.end_time,
                             "attributes": {k: v for k, v in (s.attributes or {}).items() if isinstance(v, (str, int, float, bool))}})
                 for s in spans]
        with open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def setup(service: str, exporter: SpanExporter | None = None, *, simple: bool = False) -> TracerProvider:
    """Make this process's tracer provider. Called again with an exporter (tests), it replaces it."""
    global _provider
    if _provider is not None and exporter is None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is None and os.environ.get(TRACE_FILE_ENV):
        exporter = JsonLinesExporter(f"{os.environ[TRACE_FILE_ENV]}.{os.getpid()}")
    if exporter is None and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            # xds-protos ships a stale copy of opentelemetry-proto's files (grpc/grpc#42926);
            # installed after it, that copy lacks what the exporter imports.
            raise ImportError(f"the OTLP exporter cannot load ({e}): xds-protos overwrote opentelemetry-proto; run "
                              "pip install --no-deps --force-reinstall opentelemetry-proto==<the installed version>") from e

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
        key = (k.decode() if isinstance(k, bytes) else str(k)).lower()  # HTTP headers keep their case
        if key in (TRACEPARENT, TRACESTATE):
            carrier[key] = v.decode() if isinstance(v, bytes) else str(v)
    return propagate.extract(carrier)


def applied(specs: Sequence[Any], rules: Sequence[Any], limit: int = 50) -> dict[str, Any]:
    """A control.apply span's attributes: counts, and the ids only up to `limit` (an `up` with
    100,000 InferenceServices must not make a 100,000-item attribute)."""
    return {
        "meshserve.model_count": len(specs), "meshserve.models": [s.id for s in specs[:limit]],
        "meshserve.rule_count": len(rules), "meshserve.rules": [r.name for r in rules[:limit]],
    }


@contextlib.contextmanager
def handling(model: str, fields: Mapping[Any, Any] | None = None) -> Iterator[None]:
    """While a model's request, order or event is handled: log lines carry the model, and, when
    `fields` (a stream entry, headers) carry a trace context, the trace id; spans started inside
    are children of that context. Restores both on exit."""
    model_token = current_model.set(model) if model else None
    ctx_token = None
    if fields is not None and any((k.decode() if isinstance(k, bytes) else str(k)).lower() == TRACEPARENT for k in fields):
        ctx_token = context.attach(extract(fields))
    try:
        yield
    finally:
        if ctx_token is not None:
            context.detach(ctx_token)
        if model_token is not None:
            current_model.reset(model_token)


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
