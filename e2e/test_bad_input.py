"""Issue 9, bad input through the real gateway: each gets a clear error, nothing crashes, and the
next good request works.

Kind: e2e (session mesh: real Envoy, Valkey, runtimes).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from meshserve import devmesh
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

pytestmark = pytest.mark.e2e


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=120)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def good(mesh: devmesh.Mesh, fixtures: Path) -> None:
    code, body = curl("-X", "POST", f"{mesh.rest}/v2/models/sklearn-mnist/infer", "-d", f"@{fixtures / 'mnist-request-proto-json.json'}")
    assert code == 200 and json.loads(body)["outputs"][0]["contents"]["int64Contents"] == ["8"]


def test_body_over_the_limit(mesh: devmesh.Mesh, fixtures: Path, tmp_path: Path) -> None:
    good(mesh, fixtures)
    big = tmp_path / "big.json"
    big.write_bytes(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["' + b"a" * (MAX_REQUEST_BYTES + 1024) + b'"]}]}')
    for model in ("sklearn-mnist", "sklearn-mnist-b"):  # loaded (pod) and, possibly, cold (activator)
        code, body = curl("-X", "POST", f"{mesh.rest}/v2/models/{model}/infer", "--data-binary", f"@{big}")
        assert code == 413, body
        assert "limit" in json.loads(body)["error"]
    good(mesh, fixtures)


def test_huge_headers(mesh: devmesh.Mesh, fixtures: Path) -> None:
    # Just over Envoy's 96 KiB header limit. Envoy answers 431 and closes; if the close races the
    # client still sending, curl sees a reset (code 000), so a reset is retried, nothing else is.
    for _ in range(3):
        code, body = curl("-H", "X-Big: " + "a" * 100_000, f"{mesh.rest}/v2/models/sklearn-mnist/ready")
        if code != 0:
            break
    assert code == 431 and "error" in json.loads(body)
    good(mesh, fixtures)


def test_grpc_message_over_the_limit(mesh: devmesh.Mesh, fixtures: Path) -> None:
    good(mesh, fixtures)
    with grpc.insecure_channel(mesh.grpc, options=[("grpc.max_send_message_length", 2 * MAX_REQUEST_BYTES)]) as ch:
        req = pb.ModelInferRequest(model_name="sklearn-mnist")
        t = req.inputs.add(name="x", datatype="BYTES", shape=[1])
        t.contents.bytes_contents.append(b"a" * (MAX_REQUEST_BYTES + 1024))
        with pytest.raises(grpc.RpcError) as e:
            pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=[("mm-vmodel-id", "sklearn-mnist")], timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (e.value.details() or "")
    good(mesh, fixtures)


def test_grpc_unknown_model_and_bad_tensor(mesh: devmesh.Mesh, fixtures: Path) -> None:
    with grpc.insecure_channel(mesh.grpc) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), metadata=[("mm-vmodel-id", "nope")], timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in (e.value.details() or "")
        req = pb.ModelInferRequest(model_name="sklearn-mnist")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 64])  # no contents
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, metadata=[("mm-vmodel-id", "sklearn-mnist")], timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 64 values" in (e.value.details() or "")
    good(mesh, fixtures)
