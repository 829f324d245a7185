"""ModelMesh's payload processors through the gateway: a mesh given a processor URL (as TrustyAI's
operator gives ModelMesh pods MM_PAYLOAD_PROCESSORS) sends every inference's request and
response to it, whatever client and transport made the call.

Kind: e2e. Real Envoy configured by our xDS server, Valkey, built-in runtimes; tritonclient from
PyPI in its own venv (e2e/clientlib), run as a user's script would be; the processor is an HTTP
server of this test's (127.0.0.1, port 0) that records the JSON it is sent."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from e2e.clientlib.venv import ensure_clients
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_testing import devmesh
from meshserve_testing.payload_processor import recording_processor

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processor() -> Iterator[tuple[list[dict[str, Any]], str]]:
    with recording_processor() as p:
        yield p


def test_every_inference_through_the_gateway_reaches_the_processor(processor: tuple[list[dict[str, Any]], str]) -> None:
    got, url = processor
    py = ensure_clients(REPO)
    with devmesh.mesh(payload_processors=url) as m:
        out = subprocess.run([str(py), str(REPO / "e2e" / "clientlib" / "calls.py"), m.rest, m.grpc, "sklearn-mnist", "triton"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        calls = json.loads(out.stdout.strip().splitlines()[-1])
        inferences = [k for k in ("tritonclient.http binary", "tritonclient.http json", "tritonclient.grpc",
                                  "tritonclient.grpc mm-vmodel-id") if calls[k].get("ok") == [[8]]]
        assert len(inferences) == 4, calls
        deadline = time.monotonic() + 30
        while len(got) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
    requests = [g for g in got if g["kind"] == "request"]
    responses = {g["id"]: g for g in got if g["kind"] == "response"}
    assert len(requests) == 4 and len(responses) == 4, got
    for r in requests:
        assert r["modelid"].startswith("sklearn-mnist__isvc-"), r["modelid"]
        sent = pb.ModelInferRequest.FromString(base64.b64decode(r["data"]))
        assert sent.inputs[0].name == "predict" and list(sent.inputs[0].shape) == [1, 64]
        answer = responses[r["id"]]
        assert answer["status"] == "OK" and answer["modelid"] == r["modelid"]
        assert _predicted(pb.ModelInferResponse.FromString(base64.b64decode(answer["data"]))) == [8]


def _predicted(resp: pb.ModelInferResponse) -> list[int]:
    # tritonclient's gRPC sends raw tensors, and gets its answer raw (binary tensor data).
    if resp.raw_output_contents:
        return np.frombuffer(resp.raw_output_contents[0], dtype="<i8").tolist()
    return list(resp.outputs[0].contents.int64_contents)
