"""`python -m meshserve_loader.builtin --index N [--ports-file F]`: the built-in runtime of
runtime pod N. With MESHSERVE_RUNTIME_BASE_PORT=0 every listener binds port 0; `--ports-file`
gets the ports bound, for whoever started it (the loader: servers/builtin.py)."""

from __future__ import annotations

import os

# One BLAS thread per inference thread: the runtime already runs one inference thread per CPU
# (table.worker_count), and OpenBLAS's own threads on top spin-wait for each other. On a busy
# 2-core machine a MiniLM embedding took 1.1-1.4 s with OpenBLAS's default against 81-88 ms
# with one thread (median of 15, side by side; docs/design/adapters.md). Before numpy loads;
# a value the operator set wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
from pathlib import Path  # noqa: E402

from meshserve import logs
from meshserve.settings import Settings  # noqa: E402
from meshserve_loader.builtin.server import serve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="meshserve_loader.builtin")
    ap.add_argument("--index", type=int, required=True, help="runtime pod number (sets its ports)")
    ap.add_argument("--ports-file", type=Path, default=None, help="write the ports bound here, as JSON {rest, grpc, control}")
    args = ap.parse_args()
    s = Settings.from_env()
    logs.setup(f"runtime-{args.index}", s.log_json)
    rest, grpc_port, _ = s.pod_ports(args.index)
    # The roots are the ones the loader of this pod fetches into (same settings, same pod id).
    asyncio.run(serve(s.host, rest, grpc_port, s.allow_executable_formats, s.load_timeout_seconds,
                      control_port=s.pod_control_port(args.index), allowed_roots=s.allowed_model_roots(s.pod_name(args.index)),
                      ports_file=args.ports_file, preimport=[f for f in s.runtime_preimport.split(",") if f.strip()],
                      payload_processors=s.payload_processors))


if __name__ == "__main__":
    main()
