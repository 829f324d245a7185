"""The loader agent of one runtime pod.

    python -m meshserve_loader --index N      `meshserve up`: pod `pod-N`, ports offset by N
    MESHSERVE_POD_ID=<name> python -m meshserve_loader
                                              a Kubernetes pod (cluster mode): id <name>, fixed ports

In cluster mode the id is the pod's name from the downward API (istio/runtime-*.yaml) and the
ports are MESHSERVE_POD_PORT (8080 REST, 8081 gRPC, 8082 loader metrics) on every pod; an index,
if given, only picks the entry of MESHSERVE_POD_RUNTIMES (one pool runs one runtime: 0)."""

from __future__ import annotations

import argparse
import asyncio

from meshserve import logs
from meshserve.settings import Settings
from meshserve_loader.run import run


def pod_index(s: Settings, index: int | None) -> int:
    """The index the pod runs as; SystemExit with what to set when the pod has no identity."""
    if index is not None:
        return index
    if s.cluster_pod:
        return 0
    raise SystemExit(
        "meshserve_loader: no pod identity. In a cluster set MESHSERVE_POD_ID (the pod's name, from the downward "
        "API fieldRef metadata.name: istio/runtime-builtin.yaml); locally pass --index N (as `meshserve up` does)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(prog="meshserve_loader")
    ap.add_argument("--index", type=int, default=None,
                    help="runtime pod number for `meshserve up` (sets its id pod-N and its ports); "
                         "not needed with MESHSERVE_POD_ID (cluster mode: that id, fixed ports)")
    args = ap.parse_args()
    s = Settings.from_env()
    index = pod_index(s, args.index)
    # In a cluster the pod name is on every log line already (kubectl logs, the log collector).
    logs.setup("loader" if s.cluster_pod else f"loader-{index}", s.log_json)
    asyncio.run(run(s, index))


if __name__ == "__main__":
    main()
