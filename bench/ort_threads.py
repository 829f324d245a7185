"""The text encoder's onnxruntime session with one intra-op thread (what the runtime uses,
builtin/text_onnx.py) against two, in process, side by side: a lone request's latency (back to
back, and after 20 ms idle, as a cold request finds the pod) and throughput with 2 and 4
threads calling at once (the runtime runs one inference thread per CPU).

    .venv/bin/python -m bench.ort_threads [--rounds 3]    # -> bench/results/ort_threads.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

from bench.common import REPO, write

TEXT = "A man is eating food."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100, help="lone calls per side and round")
    args = ap.parse_args(argv)
    import numpy as np
    import onnxruntime as ort

    from meshserve_loader.builtin import text
    from meshserve_loader.examples.minilm_setup import ensure_weights

    weights = ensure_weights(REPO / ".cache-models")
    captured: dict[str, Any] = {}
    real = ort.InferenceSession

    def capture(model: bytes, so: Any, providers: Any) -> Any:
        captured["model"] = model
        return real(model, so, providers=providers)

    ort.InferenceSession = capture  # type: ignore[misc]
    try:
        enc = text.TextEncoder(weights)
    finally:
        ort.InferenceSession = real  # type: ignore[misc]
    e = enc.tok.encode_batch([TEXT])
    ids = np.array([x.ids for x in e], np.int64)
    feeds = {"ids": ids, "mask": np.array([x.attention_mask for x in e], np.int64), "types": np.zeros_like(ids), **enc._no_lora}

    def session(intra: int, spin: str) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = intra, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        return real(captured["model"], so, providers=["CPUExecutionProvider"])

    def lone(s: Any, gap: float) -> float:
        took = []
        for _ in range(args.calls):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            s.run(["hidden"], feeds)
            took.append((time.perf_counter() - t0) * 1000)
        return statistics.median(took)

    def together(s: Any, threads: int, calls: int = 60) -> float:
        def work() -> None:
            for _ in range(calls):
                s.run(["hidden"], feeds)
        ts = [threading.Thread(target=work) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return threads * calls / (time.perf_counter() - t0)

    sides = {"1 thread (the runtime's)": session(1, "1"), "2 threads, no spinning": session(2, "0"), "2 threads, spinning": session(2, "1")}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, s in sides.items():
            runs[name].append({"lone_ms": lone(s, 0.0), "after_idle_ms": lone(s, 0.02),
                               "per_s_2_callers": together(s, 2), "per_s_4_callers": together(s, 4)})
    med = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in runs.items()}
    res = {"text": TEXT, "tokens": int(ids.shape[1]), "rounds": args.rounds, "cpus": os.cpu_count(), "median_of_rounds": med, "runs": runs}
    print(write("ort_threads", res))
    return res


if __name__ == "__main__":
    main()
