"""Kind: unit (pure). KServe v2 request and response encoding in both JSON forms and gRPC."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meshserve_loader.builtin import codec
from meshserve_proto import grpc_predict_v2_pb2 as pb


def test_proto_json_request_and_response_match_the_seed() -> None:
    body = json.dumps({"inputs": [{"name": "predict", "shape": [1, 2], "datatype": "FP32", "contents": {"fp32_contents": [1.5, 2.0]}}]})
    req = codec.decode_json_request(body.encode())
    assert req.form == "proto"
    assert req.inputs[0].array.tolist() == [[1.5, 2.0]]
    out = json.loads(codec.encode_json_response("m__isvc-0123456789", req, {"predict": np.array([8])}))
    assert out == {
        "modelName": "m__isvc-0123456789",
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": ["1", "1"], "contents": {"int64Contents": ["8"]}}],
    }


def test_rest_form_round_trip() -> None:
    body = json.dumps({"id": "r1", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]})
    req = codec.decode_json_request(body.encode())
    assert req.form == "rest" and req.inputs[0].array.dtype == np.int32
    out = json.loads(codec.encode_json_response("m", req, {"y": np.array([[1.0, 2.0]], dtype=np.float32)}))
    assert out == {"model_name": "m", "id": "r1", "outputs": [{"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"{}", "non-empty 'inputs'"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}', "needs 2 values"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "NOPE", "data": [1]}]}', "unknown datatype"),
        (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', "non-negative"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', "does not match"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "contents": {"bogus": [1]}}]}', "proto3-JSON"),
        (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', "'name' is required"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_json_request(body)


def test_grpc_raw_contents() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    msg.raw_input_contents.append(np.array([1, 2, 3], dtype="<f4").tobytes())
    req = codec.decode_grpc_request(msg)
    assert req.inputs[0].array.tolist() == [[1.0, 2.0, 3.0]]
    msg.raw_input_contents[0] = b"\x00" * 5
    with pytest.raises(codec.CodecError, match="raw content is 5 bytes"):
        codec.decode_grpc_request(msg)


def test_bytes_outputs() -> None:
    resp = codec.encode_grpc_response("m", "", {"output": np.array([b"hi"], dtype=object)})
    assert resp.outputs[0].datatype == "BYTES" and list(resp.outputs[0].contents.bytes_contents) == [b"hi"]


# Issue 18 §2: client input that used to end in a 500 (or a wrong answer) must be a CodecError
# (400 / INVALID_ARGUMENT) that says what is wrong.


def _rest(shape: object, data: object, datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}).encode()


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 5_000 + b"1" + b"]" * 5_000 + b"}]}", "nested too deeply"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}]}", "nested more than 32 levels"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', "NaN is not a JSON number"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [-Infinity]}]}', "-Infinity is not a JSON number"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1e309]}]}', "must be finite"),
        (_rest([1], [1e39]), "must be finite"),  # fits FP64, overflows FP32
        (_rest([4294967296, 4294967296], []), "18446744073709551616 elements"),
        (_rest([10**12, 10**12], []), "1000000000000000000000000 elements"),
        (_rest([1] * 40, [1]), "40 dimensions"),
    ],
)
def test_hostile_json_is_a_codec_error(body: bytes, message: str) -> None:
    """Kind: unit (pure, in-memory)."""
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_json_request(body)


def test_zero_rows_decode_and_are_left_to_the_model() -> None:
    """Kind: unit (pure). A [0, 64] tensor is valid v2; whether a model takes zero rows is the
    model's call (formats.py turns scikit-learn's refusal into a CodecError)."""
    assert codec.decode_json_request(_rest([0, 64], [])).inputs[0].array.shape == (0, 64)


def test_hostile_grpc_requests_are_codec_errors() -> None:
    """Kind: unit (pure, in-memory)."""
    with pytest.raises(codec.CodecError, match="at least one input"):
        codec.decode_grpc_request(pb.ModelInferRequest(model_name="m"))
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[4294967296, 4294967296])
    with pytest.raises(codec.CodecError, match="18446744073709551616 elements"):
        codec.decode_grpc_request(msg)
    msg.raw_input_contents.append(b"")
    with pytest.raises(codec.CodecError, match="18446744073709551616 elements"):
        codec.decode_grpc_request(msg)


def test_contents_and_raw_input_contents_together_are_refused() -> None:
    """Kind: unit (pure). The protocol allows one or the other; raw data used to win silently."""
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    t.contents.fp32_contents.extend([1.0, 2.0])
    msg.raw_input_contents.append(np.array([3, 4], dtype="<f4").tobytes())
    with pytest.raises(codec.CodecError, match="both contents and raw_input_contents"):
        codec.decode_grpc_request(msg)
