"""Tensors as raw bytes: Triton's binary tensor data extension for REST, and gRPC's
`raw_input_contents`/`raw_output_contents`. Pure functions.

REST (the extension tritonclient.http and the kserve SDK use by default): the request body is a
JSON header of `Inference-Header-Content-Length` bytes, then the data of every input whose
`parameters.binary_data_size` is set, in input order. Outputs are sent the same way when asked:
`parameters.binary_data_output` on the request (all outputs) or `parameters.binary_data` on a
requested output; the answer then carries the JSON length in the same header.

gRPC: an answer uses `raw_output_contents` when its request used `raw_input_contents`, and
`contents` otherwise, as MLServer does (its ModelInferResponseConverter follows the request) and
tritonclient needs (its `as_numpy()` reads raw outputs only). The seed's proto-JSON curl, which
sends `contents`, keeps getting `int64Contents`.

Raw layouts: little-endian numbers; BYTES elements each prefixed by a 4-byte little-endian length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshserve_loader.builtin import codec
from meshserve_proto import grpc_predict_v2_pb2 as pb

HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class OutputWants:
    """Which outputs the client wants as raw bytes."""

    all_binary: bool = False
    binary: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, name: str) -> bool:
        return self.all_binary or name in self.binary

    @property
    def any(self) -> bool:
        return self.all_binary or bool(self.binary)


def _flag(params: Any, key: str) -> bool:
    return isinstance(params, dict) and params.get(key) is True


def output_wants(doc: dict[str, Any]) -> OutputWants:
    outs = doc.get("outputs") if isinstance(doc.get("outputs"), list) else []
    named = frozenset(o["name"] for o in outs if isinstance(o, dict) and isinstance(o.get("name"), str) and _flag(o.get("parameters"), "binary_data"))
    return OutputWants(_flag(doc.get("parameters"), "binary_data_output"), named)


def _load_header(header: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(header)
    except RecursionError:
        raise codec.CodecError("request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise codec.CodecError(f"the JSON header ({HEADER} bytes) is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise codec.CodecError("request body must be a JSON object with an 'inputs' list")
    return doc


def parse_header_length(value: str, body_len: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise codec.CodecError(f"{HEADER} must be a byte count, got {value!r}") from None
    if not 0 < n <= body_len:
        raise codec.CodecError(f"{HEADER} is {n}, but the body has {body_len} bytes")
    return n


def decode_request(body: bytes, header_len: int) -> tuple[codec.InferRequest, OutputWants]:
    """A REST request with binary tensor data: JSON header, then the inputs' raw bytes."""
    doc = _load_header(body[:header_len])
    blob = memoryview(body)[header_len:]
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise codec.CodecError("request needs a non-empty 'inputs' list")
    tensors: list[codec.Tensor] = []
    off = 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise codec.CodecError(f"inputs[{i}] must be an object with a 'name'")
        name = inp["name"]
        datatype = inp.get("datatype")
        if not isinstance(datatype, str) or datatype not in codec.DATATYPES:
            raise codec.CodecError(f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(codec.DATATYPES)}")
        shape = codec._check_shape(name, inp.get("shape"))
        params = inp.get("parameters") if isinstance(inp.get("parameters"), dict) else {}
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise codec.CodecError(f"input '{name}': binary_data_size must be a non-negative integer")
            if "data" in inp:
                raise codec.CodecError(f"input '{name}' has both 'data' and binary_data_size: send one")
            if off + size > len(blob):
                raise codec.CodecError(f"input '{name}': binary_data_size {size} runs past the end of the body ({len(blob) - off} bytes left)")
            arr = codec._from_raw(name, datatype, shape, bytes(blob[off : off + size]))
            off += size
        elif "data" in inp:
            arr = codec._to_array(name, datatype, shape, inp["data"])
        else:
            raise codec.CodecError(f"input '{name}': 'data' or parameters.binary_data_size is required")
        tensors.append(codec.Tensor(name, datatype, shape, arr))
    if off != len(blob):
        raise codec.CodecError(f"the body has {len(blob) - off} bytes after the inputs' binary data")
    outs = doc.get("outputs")
    names = [o.get("name") for o in outs if isinstance(o, dict)] if isinstance(outs, list) else None
    rid = doc.get("id")
    return codec.InferRequest(tensors, id=rid if isinstance(rid, str) else "", outputs=names or None, form="rest"), output_wants(doc)


def tensor_bytes(a: np.ndarray) -> bytes:
    """An output's raw layout: little-endian numbers, or length-prefixed BYTES elements."""
    if codec.datatype_of(a) == "BYTES":
        parts = []
        for x in a.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def encode_response(model_name: str, req: codec.InferRequest, outputs: dict[str, np.ndarray], wants: OutputWants) -> tuple[bytes, int | None]:
    """(body, JSON header length or None). Without binary outputs it is the plain JSON answer."""
    if not wants.any:
        return codec.encode_json_response(model_name, req, outputs), None
    outs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, a in outputs.items():
        dt = codec.datatype_of(a)
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": codec._output_shape(a)}
        if wants(name):
            raw = tensor_bytes(a)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = [codec._as_text(name, x) if isinstance(x, bytes) else x for x in a.reshape(-1).tolist()]
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": outs}
    if req.id:
        doc["id"] = req.id
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), len(head)


def raw_grpc_response(model_name: str, req_id: str, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """The answer to a request that sent `raw_input_contents`: every output as raw bytes."""
    resp = pb.ModelInferResponse(model_name=model_name, id=req_id)
    for name, a in outputs.items():
        resp.outputs.add(name=name, datatype=codec.datatype_of(a), shape=codec._output_shape(a))
        resp.raw_output_contents.append(tensor_bytes(a))
    return resp


def grpc_request(model_name: str, req: codec.InferRequest) -> pb.ModelInferRequest:
    """A decoded request as the gRPC message a gRPC client would have sent (for the payload
    processors, which see every inference as gRPC, as ModelMesh's REST proxy makes it). Typed
    `contents` where the datatype has a field; if one has none (FP16, BF16), every input goes
    as raw_input_contents, since the protocol forbids mixing the two."""
    msg = pb.ModelInferRequest(model_name=model_name, id=req.id)
    raw = any(not codec.DATATYPES[t.datatype][1] for t in req.inputs)
    for t in req.inputs:
        inp = msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if raw:
            # BF16 arrives widened to float32 (codec); its raw form is the top half again.
            a = (t.array.astype("<f4").view("<u4") >> 16).astype("<u2") if t.datatype == "BF16" else t.array
            msg.raw_input_contents.append(tensor_bytes(a))
        elif t.datatype == "BYTES":
            inp.contents.bytes_contents.extend(x if isinstance(x, bytes) else str(x).encode() for x in t.array.reshape(-1))
        else:
            getattr(inp.contents, codec.DATATYPES[t.datatype][1]).extend(t.array.reshape(-1).tolist())
    for name in req.outputs or ():
        msg.outputs.add(name=name)
    return msg

