"""Kind: unit (pure). Triton's binary tensor extension and raw gRPC tensors: inputs split by the
JSON header length, outputs raw when asked, raw in means raw out on gRPC, and every malformed
body is a CodecError that says what is wrong. The real clients (tritonclient, the kserve SDK)
are tested through the gateway in e2e/test_clients.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meshserve_loader.builtin import binary, codec
from meshserve_proto import grpc_predict_v2_pb2 as pb


def _body(inputs: list[dict], blobs: list[bytes], **extra: object) -> tuple[bytes, int]:
    head = json.dumps({"inputs": inputs, **extra}).encode()
    return head + b"".join(blobs), len(head)


def test_binary_inputs_and_outputs_round_trip() -> None:
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    words = [b"ab", b"", b"xyz"]
    wb = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    body, n = _body(
        [{"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
         {"name": "w", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(wb)}},
         {"name": "j", "datatype": "INT64", "shape": [2], "data": [7, 8]}],
        [x.tobytes(), wb], parameters={"binary_data_output": True},
    )
    req, wants = binary.decode_request(body, n)
    assert np.array_equal(req.inputs[0].array, x)
    assert list(req.inputs[1].array) == words
    assert list(req.inputs[2].array) == [7, 8]
    out, hl = binary.encode_response("m", req, {"y": np.array([1.5, 2.5], dtype=np.float32), "s": np.array([b"hi"], dtype=object)}, wants)
    assert hl is not None
    head = json.loads(out[:hl])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [8, 6]
    assert np.frombuffer(out[hl : hl + 8], "<f4").tolist() == [1.5, 2.5]
    assert out[hl + 8 :] == (2).to_bytes(4, "little") + b"hi"


def test_one_output_binary_the_other_json() -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}],
                       "outputs": [{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}]}).encode()
    wants = binary.output_wants(json.loads(body))
    req = codec.decode_json_request(body)
    out, hl = binary.encode_response("m", req, {"a": np.array([3], np.int64), "b": np.array([4], np.int64)}, wants)
    head = json.loads(out[:hl])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8} and head["outputs"][1]["data"] == [4]


@pytest.mark.parametrize(
    "inputs,blob,header,needle",
    [
        ([{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}], b"\0" * 4, None, "runs past the end"),
        ([{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}], b"\0" * 12, None, "bytes after"),
        ([{"name": "x", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 8}}], b"\0" * 8, None, "needs 12"),
        ([{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2], "parameters": {"binary_data_size": 8}}], b"\0" * 8, None, "both"),
        ([{"name": "x", "datatype": "FP32", "shape": [2]}], b"", None, "is required"),
        ([], b"", None, "non-empty"),
        ([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], b"", "abc", "byte count"),
        ([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], b"", "999999", "body has"),
    ],
)
def test_malformed_binary_bodies_say_what_is_wrong(inputs: list[dict], blob: bytes, header: str | None, needle: str) -> None:
    body, n = _body(inputs, [blob])
    with pytest.raises(codec.CodecError, match=needle):
        binary.decode_request(body, binary.parse_header_length(header, len(body)) if header else n)


def test_raw_grpc_in_raw_out() -> None:
    resp = binary.raw_grpc_response("m", "r1", {"predict": np.array([8], dtype=np.int64)})
    assert resp.outputs[0].datatype == "INT64" and list(resp.outputs[0].shape) == [1, 1]
    assert not resp.outputs[0].HasField("contents")
    assert np.frombuffer(resp.raw_output_contents[0], "<i8").tolist() == [8]
    assert isinstance(resp, pb.ModelInferResponse)


def test_bf16_raw_is_widened_bit_for_bit() -> None:
    """Kind: unit. BF16 values are FP32's top halves: 1.5, -2.0 and 3.140625 exactly."""
    want = np.array([1.5, -2.0, 3.140625], dtype="<f4")
    raw = (want.view("<u4") >> 16).astype("<u2").tobytes()
    body, n = _body([{"name": "x", "datatype": "BF16", "shape": [3], "parameters": {"binary_data_size": len(raw)}}], [raw])
    req, _ = binary.decode_request(body, n)
    assert req.inputs[0].array.tolist() == want.tolist()
    rest = codec.decode_json_request(json.dumps({"inputs": [{"name": "x", "datatype": "BF16", "shape": [3], "data": [1.5, -2.0, 3.140625]}]}).encode())
    assert rest.inputs[0].array.tolist() == want.tolist()
    with pytest.raises(codec.CodecError, match="needs 6"):
        binary.decode_request(*_body([{"name": "x", "datatype": "BF16", "shape": [3], "parameters": {"binary_data_size": 4}}], [raw[:4]]))


def test_bytes_that_are_not_text_are_never_altered() -> None:
    """Kind: unit. JSON cannot carry non-UTF-8 bytes: refused with how to get them, never
    replaced with U+FFFD; the binary form and gRPC carry them whole."""
    req = codec.decode_json_request(json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}).encode())
    blob = np.array([b"\xff\xfe ok", "caf\u00e9".encode()], dtype=object)
    with pytest.raises(codec.CodecError, match="binary data"):
        codec.encode_json_response("m", req, {"y": blob})
    out, hl = binary.encode_response("m", req, {"y": blob}, binary.OutputWants(all_binary=True))
    assert out[hl:] == (5).to_bytes(4, "little") + b"\xff\xfe ok" + (5).to_bytes(4, "little") + "caf\u00e9".encode()
    text = json.loads(codec.encode_json_response("m", req, {"y": np.array(["caf\u00e9".encode()], dtype=object)}))
    assert text["outputs"][0]["data"] == ["caf\u00e9"]
