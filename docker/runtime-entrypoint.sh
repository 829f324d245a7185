#!/bin/sh
# Entrypoint of the loader and runtime images (docker/Dockerfile) when they run without the
# manifests, e.g. `docker run`: the container's hostname becomes the pod id, which puts the
# loader and the built-in runtime in cluster mode (fixed ports 8080 REST, 8081 gRPC, 8082 loader
# metrics; see MESHSERVE_POD_ID in meshserve/settings.py). The manifests in istio/ don't use this:
# they set MESHSERVE_POD_ID from the downward API (metadata.name) themselves.
# The index is required by the built-in runtime's command line and only picks the first entry of
# MESHSERVE_POD_RUNTIMES in cluster mode.
set -eu
MESHSERVE_POD_ID="${MESHSERVE_POD_ID:-${HOSTNAME:?set MESHSERVE_POD_ID (the pod id) or HOSTNAME}}"
export MESHSERVE_POD_ID
exec "$@" --index 0
