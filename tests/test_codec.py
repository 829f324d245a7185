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
