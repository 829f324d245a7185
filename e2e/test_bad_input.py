"""Issues 9 and 18, bad and hostile input through the real gateway: each gets a clear error,
nothing crashes or stalls, and the next good request works.

Kind: e2e (session mesh: real Envoy, Valkey, runtimes).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import subprocess
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc
import pytest

from meshserve_testing import devmesh
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def curl(*args: str, input_bytes: bytes | None = None) -> tuple[int, str]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], input=input_bytes, capture_output=True, timeout=120)
    body, _, code = out.stdout.decode(errors="replace").rpartition("\n")
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


# Issue 18 §2 and §3: hostile input through the real gateway. Each was a 500, UNKNOWN, a reset or
# a wrong answer; each must be a clear 4xx (gRPC INVALID_ARGUMENT / RESOURCE_EXHAUSTED), and the
# next good request must still answer.


def _infer(mesh: devmesh.Mesh, body: bytes, *headers: str, model: str = "sklearn-mnist") -> tuple[int, str]:
    return curl("-X", "POST", f"{mesh.rest}/v2/models/{model}/infer", *(a for h in headers for a in ("-H", h)), "--data-binary", "@-", input_bytes=body)


def _rest(shape: list[int], data: object) -> bytes:
    return json.dumps({"inputs": [{"name": "predict", "shape": shape, "datatype": "FP32", "data": data}]}).encode()


HOSTILE_JSON = [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": [NaN' + b", 0" * 63 + b"]}]}", "NaN is not a JSON number"),
    (b'{"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": [-Infinity' + b", 0" * 63 + b"]}]}", "Infinity is not a JSON number"),
    (b'{"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": [1e309' + b", 0" * 63 + b"]}]}", "must be finite"),
    (_rest([4294967296, 4294967296], []), "18446744073709551616 elements"),
    (_rest([10**12, 10**12], []), "1000000000000000000000000 elements"),
    (_rest([0, 64], []), "0 sample"),
]


@pytest.mark.parametrize("body, message", HOSTILE_JSON, ids=["deep", "nan", "-inf", "1e309", "2^64", "10^24", "0-rows"])
def test_hostile_json_is_a_400(mesh: devmesh.Mesh, fixtures: Path, body: bytes, message: str) -> None:
    code, text = _infer(mesh, body)
    assert code == 400 and message in json.loads(text)["error"], text
    good(mesh, fixtures)


V1_HOSTILE = [
    (b'{"model": "sklearn-mnist", "input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model": "sklearn-mnist", "input": ', "could not parse the JSON body"),
    (b'{"model": ["sklearn-mnist"], "input": "x"}', "you must provide a model parameter"),
]


@pytest.mark.parametrize("body, message", V1_HOSTILE, ids=["deep-input", "deep", "truncated", "model-list"])
def test_hostile_openai_json_is_a_400_in_openai_shape(mesh: devmesh.Mesh, fixtures: Path, body: bytes, message: str) -> None:
    """Whichever hop reads the body (Envoy's json_to_metadata cannot, so the activator does; a
    warm model's runtime otherwise), the answer is OpenAI's 400. Before: 10,000 nested arrays
    under `input` were a 500 "Server got itself in trouble" from the activator."""
    code, text = curl("-X", "POST", f"{mesh.rest}/v1/embeddings", "-H", "content-type: application/json", "--data-binary", "@-", input_bytes=body)
    err = json.loads(text)["error"]
    assert code == 400 and message in err["message"] and err["type"] == "invalid_request_error", text
    good(mesh, fixtures)


def test_content_encoding(mesh: devmesh.Mesh, fixtures: Path) -> None:
    plain = (fixtures / "mnist-request-proto-json.json").read_bytes()
    code, text = _infer(mesh, gzip.compress(plain), "Content-Encoding: gzip")
    assert code == 200 and json.loads(text)["outputs"][0]["contents"]["int64Contents"] == ["8"], text
    code, text = _infer(mesh, plain, "Content-Encoding: gzip")  # was a 500 with a traceback
    assert code == 400 and "not valid gzip" in json.loads(text)["error"], text
    good(mesh, fixtures)
    code, text = _infer(mesh, plain, "Content-Encoding: br")
    assert code == 415 and "not supported" in json.loads(text)["error"], text
    good(mesh, fixtures)


def gzip_bomb() -> bytes:
    """1 GiB of zeros in ~1 MB of gzip (seconds to make: make it before polling)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join([*(z.compress(bytes(1 << 20)) for _ in range(1024)), z.flush()])


def _while_polling(url: str, polls: int, act: "Callable[[], T]") -> "tuple[T, float]":
    """`act()`'s result, and the slowest answer of `url` polled (bounded in count) meanwhile."""
    slowest: list[float] = []

    def poll() -> None:
        for _ in range(polls):
            t0 = time.monotonic()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=10).read()
            slowest.append(time.monotonic() - t0)
            time.sleep(0.02)

    with ThreadPoolExecutor(1) as ex:
        poller = ex.submit(poll)
        out = act()
        poller.result(timeout=60)
    return out, max(slowest)


def test_gzip_bomb_is_a_413_and_does_not_stall_the_runtime(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """1 GiB of zeros in ~1 MB of gzip. It used to be inflated on the runtime's event loop, which
    answered nothing else (health included) for 3-4 s. The runtime's own ready endpoint is
    polled, bounded in count, while the bomb is in flight."""
    good(mesh, fixtures)
    ready = f"{mesh.pod_rest(0)}/v2/models/sklearn-mnist/ready"
    bomb = gzip_bomb()
    codes, slowest = _while_polling(ready, 60, lambda: [_infer(mesh, bomb, "Content-Encoding: gzip") for _ in range(3)])
    assert slowest < 0.5, f"the runtime stalled {slowest:.2f}s"
    for code, text in codes:
        assert code == 413 and "decompresses to more than" in json.loads(text)["error"], text
    good(mesh, fixtures)


def test_body_over_the_limit_sent_whole_before_reading(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """100 MB from a client that reads the answer only once it has sent everything (a raw
    socket, as http.client does): it used to be reset mid-send and never saw the 413."""
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["' + b"a" * (100 << 20) + b'"]}]}'
    port = int(mesh.rest.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"POST /v2/models/sklearn-mnist/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        s.sendall(body)  # ConnectionResetError here was the bug
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert "limit" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    good(mesh, fixtures)


def test_http_1_0_is_served(mesh: devmesh.Mesh, fixtures: Path) -> None:
    code, body = curl("--http1.0", "-X", "POST", f"{mesh.rest}/v2/models/sklearn-mnist/infer", "-d", f"@{fixtures / 'mnist-request-proto-json.json'}")
    assert code == 200 and json.loads(body)["outputs"][0]["contents"]["int64Contents"] == ["8"], body
    good(mesh, fixtures)


def _grpc_good(stub: pbg.GRPCInferenceServiceStub, fixtures: Path) -> None:
    row = json.loads((fixtures / "mnist-request-v2-rest.json").read_text())["inputs"][0]["data"]
    req = pb.ModelInferRequest(model_name="sklearn-mnist")
    req.inputs.add(name="predict", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(row)
    assert list(stub.ModelInfer(req, timeout=60).outputs[0].contents.int64_contents) == [8]


def test_grpc_hostile_messages(mesh: devmesh.Mesh, fixtures: Path) -> None:
    nan_row = pb.ModelInferRequest(model_name="sklearn-mnist")
    nan_row.inputs.add(name="predict", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([float("nan")] + [0.0] * 63)
    both = pb.ModelInferRequest(model_name="sklearn-mnist")
    both.inputs.add(name="predict", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 64)
    both.raw_input_contents.append(bytes(4 * 64))
    cases = [
        (pb.ModelInferRequest(model_name="sklearn-mnist").SerializeToString(), "at least one input"),  # was NOT_FOUND
        (nan_row.SerializeToString(), "Input X contains NaN"),  # was UNKNOWN
        (nan_row.SerializeToString()[:-7], "not a valid ModelInferRequest"),  # truncated: was UNKNOWN
        (both.SerializeToString(), "both contents and raw_input_contents"),  # raw data used to win
    ]
    with grpc.insecure_channel(mesh.grpc) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString)
        for message, want in cases:
            for metadata in ([("mm-vmodel-id", "sklearn-mnist")], []):  # routed by header, or by the message
                with pytest.raises(grpc.RpcError) as e:
                    raw(message, metadata=metadata, timeout=60)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (want, e.value.code(), e.value.details())
                details = e.value.details() or ""
                assert want in details and "DecodeError" not in details and "<class" not in details, details
                _grpc_good(stub, fixtures)
    good(mesh, fixtures)


def test_grpc_hostile_repository_calls(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """Triton's repository RPCs at the gateway: bytes that are no message, a repository name,
    and a load parameter meshserve cannot honour each get their gRPC status, then inference
    goes on."""
    load = pb.RepositoryModelLoadRequest(model_name="sklearn-mnist")
    load.parameters["file:1/model.onnx"].bytes_param = b"\x00"
    cases = [
        ("RepositoryModelLoad", b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf message"),
        ("RepositoryIndex", b"\x0a\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf message"),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(repository_name="r", model_name="sklearn-mnist").SerializeToString(),
         grpc.StatusCode.UNIMPLEMENTED, "'repository_name' specification is not supported"),
        ("RepositoryModelLoad", load.SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "parameter 'file:1/model.onnx' is not supported"),
    ]
    with grpc.insecure_channel(mesh.grpc) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        for method, message, code, want in cases:
            call = ch.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as e:
                call(message, timeout=30)
            assert e.value.code() == code and want in (e.value.details() or ""), (method, e.value.code(), e.value.details())
            _grpc_good(stub, fixtures)


def _message_of(size: int) -> pb.ModelInferRequest:
    """A ModelInferRequest for sklearn-mnist serializing to exactly `size` bytes."""
    pad = size
    for _ in range(5):
        req = pb.ModelInferRequest(model_name="sklearn-mnist")
        req.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a" * pad)
        if req.ByteSize() == size:
            return req
        pad -= req.ByteSize() - size
    raise AssertionError(f"no message of {size} bytes")


def test_grpc_limit_is_the_same_with_and_without_a_routing_header(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """Without mm-vmodel-id the gateway buffers the message to read the model name; from 16 MiB
    that failed with UNKNOWN 'Payload Too Large' while the same message with the header passed.
    Now MAX_REQUEST_BYTES passes both ways (the model then refuses BYTES: INVALID_ARGUMENT) and
    one byte more is RESOURCE_EXHAUSTED both ways."""
    with grpc.insecure_channel(mesh.grpc, options=[("grpc.max_send_message_length", 2 * MAX_REQUEST_BYTES)]) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        for size, want in ((MAX_REQUEST_BYTES, grpc.StatusCode.INVALID_ARGUMENT), (MAX_REQUEST_BYTES + 1, grpc.StatusCode.RESOURCE_EXHAUSTED)):
            req = _message_of(size)
            for metadata in ([("mm-vmodel-id", "sklearn-mnist")], []):
                with pytest.raises(grpc.RpcError) as e:
                    stub.ModelInfer(req, metadata=metadata, timeout=60)
                assert e.value.code() == want, (size, metadata, e.value.code(), e.value.details())
                if want == grpc.StatusCode.INVALID_ARGUMENT:
                    assert "not BYTES" in (e.value.details() or "")
                _grpc_good(stub, fixtures)
        # A stream's first request: without a header the gateway reads that one message for its
        # model (gRPC field extraction), bounded the same way; the answer comes in the stream.
        stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                  response_deserializer=pb.ModelStreamInferResponse.FromString)
        for metadata in ([("mm-vmodel-id", "sklearn-mnist")], []):
            (answer,) = list(stream(iter([_message_of(MAX_REQUEST_BYTES).SerializeToString()]), metadata=metadata, timeout=60))
            assert "not BYTES" in answer.error_message, (metadata, answer.error_message)
            with pytest.raises(grpc.RpcError) as e:
                list(stream(iter([_message_of(MAX_REQUEST_BYTES + 1).SerializeToString()]), metadata=metadata, timeout=60))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (metadata, e.value.code(), e.value.details())
            _grpc_good(stub, fixtures)
    good(mesh, fixtures)


@pytest.fixture(scope="module")
def cold_mesh(tmp_path_factory: pytest.TempPathFactory) -> "Iterator[devmesh.Mesh]":
    """Models nobody has asked for yet, so each request below goes through the activator."""
    d = tmp_path_factory.mktemp("cold-config")
    spec = (REPO / "mesh-config" / "sklearn-mnist.yaml").read_text()
    for i in range(4):
        (d / f"cold-{i}.yaml").write_text(spec.replace("name: sklearn-mnist", f"name: cold-{i}"))
    with devmesh.mesh(config_dir=d) as m:
        yield m


def _raw_post(mesh: devmesh.Mesh, model: str, body: bytes) -> bytes:
    port = int(mesh.rest.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        s.sendall(body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_cold_models_get_the_same_answers_to_encoded_and_oversized_bodies(cold_mesh: devmesh.Mesh, fixtures: Path) -> None:
    """The activator holds a cold model's request and forwards its body as it came: the runtime
    decodes it, bounded, on an inference thread. Before: the activator inflated it itself, so a
    plain body labelled gzip was a 500 and a gzip bomb stalled every held request; and a body
    over the limit was answered mid-send, resetting a client that reads only after sending."""
    m = cold_mesh
    plain = (fixtures / "mnist-request-proto-json.json").read_bytes()
    code, text = _infer(m, plain, "Content-Encoding: gzip", model="cold-0")
    assert code == 400 and "not valid gzip" in json.loads(text)["error"], text
    code, text = _infer(m, gzip.compress(plain), "Content-Encoding: gzip", model="cold-1")
    assert code == 200 and json.loads(text)["outputs"][0]["contents"]["int64Contents"] == ["8"], text
    health = f"http://127.0.0.1:{m.ports['activator_rest_port']}/v2/health/live"
    bomb = gzip_bomb()
    (code, text), slowest = _while_polling(health, 40, lambda: _infer(m, bomb, "Content-Encoding: gzip", model="cold-2"))
    assert code == 413 and "decompresses to more than" in json.loads(text)["error"], text
    assert slowest < 0.5, f"the activator stalled {slowest:.2f}s"
    big = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["' + b"a" * (100 << 20) + b'"]}]}'
    reply = _raw_post(m, "cold-3", big)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    code, text = _infer(m, plain, model="cold-3")
    assert code == 200 and json.loads(text)["outputs"][0]["contents"]["int64Contents"] == ["8"], text


def test_grpc_hostile_streams(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """ModelStreamInfer through the gateway, routed by header or by its first request: the
    same hostile messages as unary ones get their errors in the stream's answers (Triton's
    error_message) and the stream goes on; a stream whose first message is not a request, or
    names no model, is INVALID_ARGUMENT; one for an unknown model NOT_FOUND; one for a model
    whose load fails UNAVAILABLE with the reason; and nothing is left broken."""
    nan_row = pb.ModelInferRequest(model_name="sklearn-mnist", id="nan")
    nan_row.inputs.add(name="predict", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([float("nan")] + [0.0] * 63)
    ok = _fixture_request(fixtures)
    with grpc.insecure_channel(mesh.grpc) as ch:
        stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                  response_deserializer=pb.ModelStreamInferResponse.FromString)
        for metadata in ([("mm-vmodel-id", "sklearn-mnist")], []):
            sent = [ok.SerializeToString(), nan_row.SerializeToString(), nan_row.SerializeToString()[:-7], ok.SerializeToString()]
            got = list(stream(iter(sent), metadata=metadata, timeout=120))
            assert [bool(a.error_message) for a in got] == [False, True, True, False], got
            assert "Input X contains NaN" in got[1].error_message and got[1].infer_response.id == "nan", got[1]
            assert "not a valid ModelInferRequest" in got[2].error_message, got[2]
            assert list(got[3].infer_response.outputs[0].contents.int64_contents) == [8]
        cases = [
            ([b"\xff\xff\xff"], [], grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf message"),
            ([pb.ModelInferRequest().SerializeToString()], [], grpc.StatusCode.INVALID_ARGUMENT, "no model named"),
            ([ok.SerializeToString()], [("mm-vmodel-id", "no-such-model")], grpc.StatusCode.NOT_FOUND, "no-such-model"),
            ([ok.SerializeToString()], [("mm-vmodel-id", "broken-model")], grpc.StatusCode.UNAVAILABLE, "could not be loaded"),
        ]
        for sent, metadata, code, want in cases:
            with pytest.raises(grpc.RpcError) as e:
                list(stream(iter(sent), metadata=metadata, timeout=120))
            assert e.value.code() == code and want in (e.value.details() or ""), (want, e.value.code(), e.value.details())
        _grpc_good(pbg.GRPCInferenceServiceStub(ch), fixtures)
    good(mesh, fixtures)


def _fixture_request(fixtures: Path) -> pb.ModelInferRequest:
    from google.protobuf import json_format

    req = json_format.Parse((fixtures / "mnist-request-proto-json.json").read_text(), pb.ModelInferRequest())
    req.model_name = "sklearn-mnist"
    return req
