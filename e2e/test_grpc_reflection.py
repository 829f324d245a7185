"""gRPC server reflection at the gateway: what grpcurl does when it is not handed the .proto
file. `grpcurl -plaintext localhost:8033 list` lists the services; a call such as
`grpcurl -plaintext -H 'mm-vmodel-id: sklearn-mnist' -d @ localhost:8033
inference.GRPCInferenceService/ModelInfer` first asks reflection for the file that defines the
method, builds the request from its JSON with those descriptors, then calls.

grpcurl sends its -H headers on the reflection calls too, so a reflection call naming a model
must still be answered by the gateway, not routed to that model's pod (whose REST port in the
scoped layout, or whose runtime without reflection in the matcher layout, cannot answer it).
grpcurl asks grpc.reflection.v1 first and falls back to v1alpha on UNIMPLEMENTED
(grpcreflect.NewClientAuto); the gateway serves v1alpha, what grpcio-reflection implements.

Kind: e2e. Real Valkey, Envoy configured by our xDS (both gateway layouts), placement with the
activator, and a built-in runtime pod (`meshserve up`). The client is grpcio-reflection's
ProtoReflectionDescriptorDatabase; grpcurl itself is a Go binary that nothing reachable here
packages (README, "What was tested").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from meshserve_testing import devmesh

pytestmark = pytest.mark.e2e
SERVICE = "inference.GRPCInferenceService"


class _Headers(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """grpcurl's -H: the same headers on every call, reflection included."""

    def __init__(self, headers: list[tuple[str, str]]):
        self.headers = headers

    def _details(self, d: Any) -> Any:
        return d._replace(metadata=list(d.metadata or ()) + self.headers)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _call_as_grpcurl(channel: grpc.Channel, request_json: str) -> dict[str, Any]:
    """ModelInfer with nothing but reflection to go on: the descriptors come from the gateway."""
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(db)
    method = pool.FindServiceByName(SERVICE).methods_by_name["ModelInfer"]
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(request_json, req_cls())
    call = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)
    return json_format.MessageToDict(call(request, timeout=60))


def _activator_calls(m: devmesh.Mesh) -> int:
    _, body = devmesh.http_get(f"{m.admin}/stats?filter=activator_grpc.upstream_rq_total")
    return sum(int(x.split(":")[1]) for x in body.decode().splitlines() if "upstream_rq_total" in x)


@pytest.mark.parametrize("layout", ["scoped", "matcher"])
def test_grpcurl_without_the_proto_file(layout: str, fixtures: Path) -> None:
    request = json.loads((fixtures / "mnist-request-proto-json.json").read_text())
    expected = json.loads((fixtures / "mnist-response-proto-json.json").read_text())
    with devmesh.mesh(pods=1, xds_layout=layout) as m, grpc.insecure_channel(m.grpc) as plain:
        # `grpcurl list`: the gateway's services, asked with no model header.
        services = set(ProtoReflectionDescriptorDatabase(plain).get_services())
        assert SERVICE in services and "grpc.reflection.v1alpha.ServerReflection" in services

        # grpcurl tries v1 first; UNIMPLEMENTED is what makes it fall back to v1alpha.
        v1 = plain.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            list(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # The model named by -H, which goes on the reflection calls as well: cold (everything
        # goes to the activator), then warm, when the header alone would route to the pod.
        with_header = grpc.intercept_channel(plain, _Headers([("mm-vmodel-id", "sklearn-mnist")]))
        out = _call_as_grpcurl(with_header, json.dumps(request))
        assert out["outputs"] == expected["outputs"] and out["modelName"].startswith("sklearn-mnist__isvc-")

        def warm() -> bool:
            before = _activator_calls(m)
            _call_as_grpcurl(with_header, json.dumps(request))
            return _activator_calls(m) == before + 1  # the reflection stream only

        devmesh.wait_until(warm, 30, "a warm call to reach the pod straight, its reflection the activator")

        # The model named in the message (ModelMesh's quickstart puts model_name in -d).
        out = _call_as_grpcurl(plain, json.dumps({"model_name": "sklearn-mnist", **request}))
        assert out["outputs"] == expected["outputs"]

        # A name the mesh does not have: the call's own NOT_FOUND, after reflection worked.
        lost = grpc.intercept_channel(plain, _Headers([("mm-vmodel-id", "no-such-model")]))
        with pytest.raises(grpc.RpcError) as e:
            _call_as_grpcurl(lost, json.dumps(request))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
