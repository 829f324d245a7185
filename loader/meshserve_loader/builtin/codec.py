"""KServe v2 tensors in and out: the REST form (`data`), the proto3-JSON form (`contents`)
and gRPC messages. Pure functions; every malformed input raises CodecError with a message
that tells the client what to fix.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format

from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_proto import grpc_predict_v2_pb2 as pb


class CodecError(ValueError):
    pass


# Every element takes at least one byte on the wire (a raw BOOL or INT8, a one-digit JSON
# number), so no request within the body limit carries more: a larger count is a client's
# mistake, refused before numpy is asked for an absurd array.
MAX_ELEMENTS = MAX_REQUEST_BYTES
# numpy 1's limit on dimensions, more than any model takes; it also bounds how deeply `data`
# may nest, which keeps flattening it from recursing without limit.
MAX_DIMS = 32


# datatype -> (numpy dtype, InferTensorContents field)
DATATYPES: dict[str, tuple[Any, str]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "FP16": (np.float16, ""),
    # bfloat16 has no numpy dtype: its values are widened to float32 (exact: BF16 is FP32's top
    # half), raw ones bit for bit (_from_raw). Like FP16, only raw data in the protobuf form.
    "BF16": (np.float32, ""),
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (object, "bytes_contents"),
}
_NUMPY_TO_DATATYPE = {np.dtype(v[0]).str: k for k, v in DATATYPES.items() if v[0] is not object}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str = ""
    outputs: list[str] | None = None
    form: str = "rest"  # "rest" (v2 `data`) or "proto" (proto3 JSON `contents`) or "grpc"


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    dt = _NUMPY_TO_DATATYPE.get(array.dtype.str) or _NUMPY_TO_DATATYPE.get(array.dtype.newbyteorder("=").str)
    if dt is None:
        raise CodecError(f"unsupported output dtype {array.dtype}")
    return dt


def _check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CodecError(f"input '{name}': shape must be a list of non-negative integers")
    return shape


def element_count(name: str, shape: list[int]) -> int:
    """The shape's element count, in Python ints: numpy's int64 product wraps around
    ([2**32, 2**32] gives 0), which would let an absurd shape pass as an empty one."""
    if len(shape) > MAX_DIMS:
        raise CodecError(f"input '{name}': shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise CodecError(
            f"input '{name}': shape {shape} has {n} elements, more than a request within the "
            f"{MAX_REQUEST_BYTES >> 20} MiB limit can carry ({MAX_ELEMENTS})"
        )
    return n


def _to_array(name: str, datatype: str, shape: list[int], values: Any, finite: bool = False) -> np.ndarray:
    """`finite`: float data must hold finite numbers. JSON has no NaN or Infinity, so in the
    REST form a non-finite value is a non-standard token or a number out of the datatype's
    range (1e309, or 1e39 as FP32), never what the client meant."""
    if datatype not in DATATYPES:
        raise CodecError(f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    dtype = DATATYPES[datatype][0]
    n = element_count(name, shape)
    if dtype is object:
        flat = np.array([_as_bytes(v) for v in _flatten(name, values)], dtype=object)
    else:
        values = _flatten(name, values)
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
                flat = np.asarray(values, dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            raise CodecError(f"input '{name}': data does not match datatype {datatype}") from None
        if finite and flat.dtype.kind == "f" and not np.isfinite(flat).all():
            raise CodecError(f"input '{name}': {datatype} data must be finite numbers within the datatype's range (no NaN, Infinity or overflow)")
    if flat.size != n:
        raise CodecError(f"input '{name}': shape {shape} needs {n} values, got {flat.size}")
    return flat.reshape(shape)


def _flatten(name: str, values: Any) -> list[Any]:
    """Nested lists to one flat list, without recursion and no deeper than MAX_DIMS."""
    if not isinstance(values, (list, tuple)):
        return [values]
    out: list[Any] = []
    stack = [iter(values)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, (list, tuple)):
                if len(stack) >= MAX_DIMS:
                    raise CodecError(f"input '{name}': data is nested more than {MAX_DIMS} levels deep")
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _no_constants(token: str) -> Any:
    raise CodecError(f"request body is not valid JSON: {token} is not a JSON number")


def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    raise CodecError("BYTES data must be strings")


def decode_json_request(body: bytes) -> InferRequest:
    """Either JSON form. The proto3-JSON form is chosen when any input carries `contents`."""
    try:
        doc = json.loads(body, parse_constant=_no_constants)
    except CodecError:
        raise
    except RecursionError:
        raise CodecError("request body is nested too deeply to be an inference request") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CodecError("request body must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise CodecError("request needs a non-empty 'inputs' list")
    if any(isinstance(i, dict) and ("contents" in i) for i in inputs) or "rawInputContents" in doc or "raw_input_contents" in doc:
        try:
            msg = json_format.ParseDict(doc, pb.ModelInferRequest(), ignore_unknown_fields=False)
        except json_format.ParseError as e:
            raise CodecError(f"invalid proto3-JSON inference request: {e}") from None
        except RecursionError:
            raise CodecError("request body is nested too deeply to be an inference request") from None
        req = decode_grpc_request(msg)
        req.form = "proto"
        return req
    tensors = []
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise CodecError(f"inputs[{i}] must be an object")
        name = inp.get("name")
        if not isinstance(name, str):
            raise CodecError(f"inputs[{i}]: 'name' is required")
        datatype = inp.get("datatype")
        if not isinstance(datatype, str):
            raise CodecError(f"input '{name}': 'datatype' is required")
        shape = _check_shape(name, inp.get("shape"))
        if "data" not in inp:
            raise CodecError(f"input '{name}': 'data' is required")
        tensors.append(Tensor(name, datatype, shape, _to_array(name, datatype, shape, inp["data"], finite=True)))
    outs = doc.get("outputs")
    names = [o.get("name") for o in outs if isinstance(o, dict)] if isinstance(outs, list) else None
    rid = doc.get("id")
    return InferRequest(tensors, id=rid if isinstance(rid, str) else "", outputs=names or None, form="rest")


def decode_grpc_request(msg: pb.ModelInferRequest) -> InferRequest:
    tensors = []
    if not msg.inputs:
        raise CodecError("request needs at least one input tensor")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise CodecError(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs")
    for i, inp in enumerate(msg.inputs):
        shape = [int(d) for d in inp.shape]
        if any(d < 0 for d in shape):
            raise CodecError(f"input '{inp.name}': shape must be non-negative")
        if inp.datatype not in DATATYPES:
            raise CodecError(f"input '{inp.name}': unknown datatype {inp.datatype!r}")
        dtype, field = DATATYPES[inp.datatype]
        # The protocol forbids both; picking one would silently drop the client's other data.
        if raw and inp.contents.ListFields():
            raise CodecError(f"input '{inp.name}' has both contents and raw_input_contents; send each input's data in one of them")
        if raw:
            arr = _from_raw(inp.name, inp.datatype, shape, raw[i])
        else:
            if not field:
                raise CodecError(f"input '{inp.name}': {inp.datatype} must be sent as raw_input_contents")
            arr = _to_array(inp.name, inp.datatype, shape, list(getattr(inp.contents, field)))
        tensors.append(Tensor(inp.name, inp.datatype, shape, arr))
    return InferRequest(tensors, id=msg.id, outputs=[o.name for o in msg.outputs] or None, form="grpc")


def _from_raw(name: str, datatype: str, shape: list[int], buf: bytes) -> np.ndarray:
    dtype = DATATYPES[datatype][0]
    n = element_count(name, shape)
    if dtype is object:
        items, off = [], 0
        while off < len(buf):
            if off + 4 > len(buf):
                raise CodecError(f"input '{name}': truncated BYTES element")
            ln = int.from_bytes(buf[off : off + 4], "little")
            items.append(buf[off + 4 : off + 4 + ln])
            off += 4 + ln
        arr = np.array(items, dtype=object)
    elif datatype == "BF16":
        if len(buf) != n * 2:
            raise CodecError(f"input '{name}': raw content is {len(buf)} bytes, shape {shape} of BF16 needs {n * 2}")
        arr = (np.frombuffer(buf, dtype="<u2").astype("<u4") << 16).view("<f4")
    else:
        width = np.dtype(dtype).itemsize
        if len(buf) != n * width:
            raise CodecError(f"input '{name}': raw content is {len(buf)} bytes, shape {shape} of {datatype} needs {n * width}")
        arr = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.size != n:
        raise CodecError(f"input '{name}': shape {shape} needs {n} values, got {arr.size}")
    return arr.reshape(shape)


def _output_shape(a: np.ndarray) -> list[int]:
    # A 1-D prediction per row is reported as [N, 1], as MLServer's codecs do.
    return [int(a.shape[0]), 1] if a.ndim == 1 else [int(d) for d in a.shape]


def encode_grpc_response(model_name: str, req_id: str, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model_name, id=req_id)
    for name, a in outputs.items():
        dt = datatype_of(a)
        t = resp.outputs.add(name=name, datatype=dt, shape=_output_shape(a))
        field = DATATYPES[dt][1]
        flat = a.reshape(-1)
        if dt == "BYTES":
            t.contents.bytes_contents.extend(_as_bytes(x) for x in flat)
        elif field:
            getattr(t.contents, field).extend(flat.tolist())
        else:
            resp.raw_output_contents.append(flat.astype("<f2").tobytes())
    return resp


def _as_text(output: str, b: bytes) -> str:
    """A BYTES element as JSON text. JSON carries only text: bytes that are not UTF-8 would come
    out altered (replacement characters), so they are refused, saying how to get them whole."""
    try:
        return b.decode()
    except UnicodeDecodeError:
        raise CodecError(
            f"output '{output}' holds bytes that are not UTF-8 text, which JSON cannot carry unaltered: "
            "ask for it as binary data (Triton's binary tensor extension: parameters.binary_data on the output) or use gRPC"
        ) from None


def encode_json_response(model_name: str, req: InferRequest, outputs: dict[str, np.ndarray]) -> bytes:
    if req.form == "proto":
        msg = encode_grpc_response(model_name, req.id, outputs)
        return json_format.MessageToJson(msg, indent=None).encode()
    outs = []
    for name, a in outputs.items():
        dt = datatype_of(a)
        flat = a.reshape(-1)
        data = [_as_text(name, x) if isinstance(x, bytes) else x for x in flat.tolist()]
        outs.append({"name": name, "shape": _output_shape(a), "datatype": dt, "data": data})
    doc: dict[str, Any] = {"model_name": model_name, "outputs": outs}
    if req.id:
        doc["id"] = req.id
    return json.dumps(doc).encode()


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()
