#!/bin/sh
# Install one role's lock file (docker/lock/<role>.txt): exactly its files, checked by hash,
# nothing resolved at build time.
set -eu
lock="$1"
pip install --no-deps --require-hashes -r "$lock"
# xds-protos ships a stale copy of opentelemetry-proto's files (grpc/grpc#42926): whichever
# installs last wins, and the old copy breaks the OTLP exporter. Put the real one back, from
# the same lock entry (its hashes included).
awk '/^opentelemetry-proto==/ { p = 1 } p && /^ *#/ { exit } p' "$lock" > /tmp/otel-proto.txt
pip install --no-deps --require-hashes --force-reinstall -r /tmp/otel-proto.txt
python -c "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter"
