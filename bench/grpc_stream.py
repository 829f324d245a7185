"""gRPC streams through the gateway: a request's round trip on one open ModelStreamInfer stream
against a unary ModelInfer, both with `mm-vmodel-id` (Envoy straight to the pod), and a stream
with no routing header (Envoy reads its first request's model: grpc_fields.py). Sequential requests (send, wait for
the answer, send the next), and the first answer of new streams, one warm tiny model, sides alternated round by round in one mesh so
machine noise hits them alike.

    .venv/bin/python -m bench.grpc_stream [--rounds 6] [--requests 300]   # -> bench/results/grpc_stream.json
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc

from bench.common import pct, string_model_mesh, write
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

HEADER = [("mm-vmodel-id", "tiny")]


def _request(i: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny", id=str(i))
    req.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    return req


def _unary(stub: pbg.GRPCInferenceServiceStub, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        stub.ModelInfer(_request(i), metadata=HEADER, timeout=30)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _stream(stub: pbg.GRPCInferenceServiceStub, n: int, metadata: list[tuple[str, str]]) -> list[float]:
    more: "queue.Queue[pb.ModelInferRequest | None]" = queue.Queue()

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (req := more.get()) is not None:
            yield req

    answers = stub.ModelStreamInfer(requests(), metadata=metadata, timeout=300)
    more.put(_request(-1))  # the stream's set-up (and, with no header, its first message read for routing) is not a request's
    assert not next(answers).error_message
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        more.put(_request(i))
        a = next(answers)
        out.append((time.perf_counter() - t0) * 1000)
        assert not a.error_message, a.error_message
    more.put(None)
    list(answers)
    return out


def _first_answers(stub: pbg.GRPCInferenceServiceStub, n: int, metadata: list[tuple[str, str]]) -> list[float]:
    """n streams, each opened, sent one request and closed: the time to its answer (a stream's
    set-up, and without a header Envoy's read of its first message, included)."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        (a,) = list(stub.ModelStreamInfer(iter([_request(i)]), metadata=metadata, timeout=30))
        out.append((time.perf_counter() - t0) * 1000)
        assert not a.error_message, a.error_message
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per side and round")
    ap.add_argument("--streams", type=int, default=50, help="one-request streams per side and round (their first answer)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, string_model_mesh(Path(tmp), ["tiny"]) as mesh:
        with grpc.insecure_channel(mesh.grpc) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(_request(0), metadata=HEADER, timeout=120)  # load it
            time.sleep(1.0)  # its route reaches the gateway
            sides: dict[str, Callable[[], list[float]]] = {
                "unary, mm-vmodel-id": lambda: _unary(stub, args.requests),
                "stream, mm-vmodel-id": lambda: _stream(stub, args.requests, HEADER),
                "stream, no header": lambda: _stream(stub, args.requests, []),
                "first answer of a new stream, mm-vmodel-id": lambda: _first_answers(stub, args.streams, HEADER),
                "first answer of a new stream, no header": lambda: _first_answers(stub, args.streams, []),
            }
            for run in sides.values():  # warm-up, not recorded
                run()
            lat: dict[str, list[float]] = {k: [] for k in sides}
            per_round: dict[str, list[float]] = {k: [] for k in sides}
            for rnd in range(args.rounds):
                order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
                for side in order:
                    got = sides[side]()
                    lat[side] += got
                    per_round[side].append(round(statistics.median(got), 3))
                print(json.dumps({"round": rnd, **{k: v[-1] for k, v in per_round.items()}}), flush=True)
    unary = statistics.median(lat["unary, mm-vmodel-id"])
    summary = {side: {"p50_ms": round(statistics.median(v), 3), "p99_ms": round(pct(v, 99), 3), "round_p50s_ms": per_round[side],
                      "p50_vs_unary": round(statistics.median(v) / unary, 3)} for side, v in lat.items()}
    doc = {"rounds": args.rounds, "requests_per_round": args.requests, "streams_per_round": args.streams, "model": "string (built-in runtime), warm", "sides": summary}
    print(json.dumps(doc, indent=1))
    print(write("grpc_stream", doc))


if __name__ == "__main__":
    main()
