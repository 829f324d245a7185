"""Run with MLServer's own Python: `python mlserver_stream.py <grpc addr> <model> <request.json> header|no-header`.
MLServer's gRPC stream (ModelStreamInfer, its dataplane.proto) called with MLServer's generated
stub, as a user of an MLServer model would call it (Seldon's streaming example does the same).
Prints the answers, each as MLServer's JSON form of the message, or the call's status."""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf import json_format
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pbg


def main() -> None:
    target, model, request_file, header = sys.argv[1:5]
    doc = json.loads(open(request_file).read())["inputs"][0]
    req = pb.ModelInferRequest(model_name=model, id="s1")
    t = req.inputs.add(name=doc["name"], datatype=doc["datatype"], shape=doc["shape"])
    t.contents.fp32_contents.extend(doc["data"])
    md = [("mm-vmodel-id", model)] if header == "header" else []
    with grpc.insecure_channel(target) as ch:
        try:
            answers = pbg.GRPCInferenceServiceStub(ch).ModelStreamInfer(iter([req]), metadata=md, timeout=150)
            print(json.dumps({"ok": [json_format.MessageToDict(a) for a in answers]}))
        except grpc.RpcError as e:
            print(json.dumps({"error": f"{e.code()}: {e.details()}"}))


if __name__ == "__main__":
    main()
