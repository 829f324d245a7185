#!/bin/sh
# Runtime pool pods (a StatefulSet): the pod's ordinal becomes the loader's index, which names
# it (`pod-<index>`) and its Redis order stream, so a restarted pod resumes its own orders.
# MESHSERVE_INDEX_OFFSET keeps pools apart (builtin 0, the next pool 1000, ...).
# The index also sets ports (runtime_base_port + 10*index); the base is shifted so that every
# pod serves on the same ports: REST 8080, gRPC 8081, loader metrics 8082.
set -eu
ordinal="${HOSTNAME##*-}"
case "$ordinal" in
  ''|*[!0-9]*)
    echo "runtime-entrypoint: HOSTNAME '$HOSTNAME' ends in no StatefulSet ordinal; run runtime pods as a StatefulSet (istio/runtime-builtin.yaml)" >&2
    exit 64 ;;
esac
index=$(( ${MESHSERVE_INDEX_OFFSET:-0} + ordinal ))
MESHSERVE_RUNTIME_BASE_PORT=$(( ${MESHSERVE_POD_PORT:-8080} - 10 * index ))
export MESHSERVE_RUNTIME_BASE_PORT
exec "$@" --index "$index"
