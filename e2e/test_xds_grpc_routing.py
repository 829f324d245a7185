"""Issue 3, item 8: plain KServe v2 gRPC clients that send no routing header reach the pod
holding the model, through the gateway's gRPC listener, with no Python on the path.

Kind: e2e. A real Envoy configured by our in-process ADS server; two stand-in gRPC runtimes
(grpcio servers answering ModelInfer with their own name and the mm-model-id they received)
as a pod and the activator.
"""

from __future__ import annotations

import contextlib
import time
from concurrent import futures
from typing import Iterator

import grpc
import pytest

from meshserve_testing.devmesh import free_port
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg
from meshserve_xds import matcher
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, envoy, wait_for
from meshserve_xds.server import GATEWAY_GROUP

pytestmark = pytest.mark.e2e

M0 = "m0__isvc-0000000000"


class FakeRuntime(pbg.GRPCInferenceServiceServicer):
    def __init__(self, name: str):
        self.name = name

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:  # noqa: N802
        md = dict(context.invocation_metadata())
        return pb.ModelInferResponse(model_name=md.get(r.MODEL_ID_HEADER, ""), id=self.name, model_version=md.get(r.VMODEL_ID_HEADER, ""))

    def ModelStreamInfer(self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext) -> Iterator[pb.ModelStreamInferResponse]:  # noqa: N802
        md = dict(context.invocation_metadata())
        for req in requests:
            yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name=md.get(r.MODEL_ID_HEADER, ""), id=self.name))


def _serve(name: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_GRPCInferenceServiceServicer_to_server(FakeRuntime(name), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@contextlib.contextmanager
def _gateway(node: str, with_activator: bool) -> Iterator[str]:
    """A real Envoy fed by the matcher layout: m0 loaded on a stand-in pod, and a stand-in
    activator (or none); the gRPC listener's address."""
    pod, pod_port = _serve("pod-0")
    act, act_port = _serve("activator") if with_activator else (None, free_port())
    ads = AdsThread().start()
    try:
        state = r.RoutingState(
            pods={"pod-0": r.Endpoint("127.0.0.1", free_port(), pod_port)},
            loaded={M0: ["pod-0"]},
            aliases={"m0": M0},
            activator=r.Endpoint("127.0.0.1", free_port(), act_port),
        )
        ads.set(GATEWAY_GROUP, matcher.build_all(state, r.ListenerConfig("127.0.0.1", 0, 0)))  # free ports, read back
        with envoy(gateway_bootstrap(node, "127.0.0.1", ads.port, 0), 0) as gw:  # admin port 0: the harness reads it back
            target = f"127.0.0.1:{gw.listener_port(r.GRPC)}"
            wait_for(lambda: _infer(target, "m0", [("mm-vmodel-id", "m0")]).id == "pod-0", 20, "gRPC route up")
            yield target
    finally:
        ads.stop()
        pod.stop(0)
        if act is not None:
            act.stop(0)


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    with _gateway("gw-grpc", with_activator=True) as target:
        yield target


def _infer(target: str, model: str, metadata: list[tuple[str, str]] | None = None) -> pb.ModelInferResponse:
    with grpc.insecure_channel(target) as ch:
        req = pb.ModelInferRequest(model_name=model, id="r1")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1.0)
        return pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=metadata or [], timeout=10)


def test_no_header_routes_by_model_name_in_the_message(gateway: str) -> None:
    for name in ("m0", M0):
        resp = _infer(gateway, name)
        assert resp.id == "pod-0" and resp.model_name == M0, resp


def test_no_header_cold_model_goes_to_the_activator(gateway: str) -> None:
    assert _infer(gateway, "not-loaded").id == "activator"


def test_headers_still_win_over_the_message(gateway: str) -> None:
    """A header names the model: the message's model_name is not looked at."""
    assert _infer(gateway, "something-else", [("mm-vmodel-id", "m0")]).id == "pod-0"
    assert _infer(gateway, "m0", [("mm-model-id", "cold__isvc-0000000000")]).id == "activator"


def _stream_first_answer(target: str, model: str, metadata: list[tuple[str, str]]) -> pb.ModelInferResponse:
    """The answer to a stream's first request, read while the stream is still open (as a
    streaming client does): a gateway that held the stream's body back would never answer."""
    import queue

    more: "queue.Queue[pb.ModelInferRequest | None]" = queue.Queue()
    more.put(pb.ModelInferRequest(model_name=model, id="s1"))

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (req := more.get()) is not None:
            yield req

    with grpc.insecure_channel(target) as ch:
        answers = pbg.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(), metadata=metadata, timeout=10)
        try:
            return next(answers).infer_response
        finally:
            more.put(None)
            answers.cancel()


def test_a_stream_goes_by_its_header_or_its_first_request(gateway: str) -> None:
    """ModelStreamInfer: with `mm-vmodel-id`, or without a header by its first request's model
    (Envoy's gRPC field extraction reads that message alone), Envoy routes the stream to the
    pod, answered while the stream is open; a cold model's stream goes to the activator."""
    assert _stream_first_answer(gateway, "m0", [("mm-vmodel-id", "m0")]).id == "pod-0"
    assert _stream_first_answer(gateway, "m0", []).id == "pod-0"
    assert _stream_first_answer(gateway, M0, []).id == "pod-0"
    assert _stream_first_answer(gateway, "not-loaded", []).id == "activator"


@pytest.fixture
def short_timeout_gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The same gateway with a route timeout of 1 s (no activator: nothing here goes to it)."""
    monkeypatch.setattr(matcher, "ROUTE_TIMEOUT_S", 1)
    with _gateway("gw-grpc-short", with_activator=False) as target:
        yield target


def test_a_stream_outlives_the_route_timeout_while_its_client_sends(short_timeout_gateway: str) -> None:
    """A stream open three times the route timeout, a request every 0.3 s, gets every answer:
    Envoy starts a route's timeout once the client has sent all of its request (end of
    stream), and a streaming client (tritonclient keeps one stream for the life of its
    process) closes its side only when it is done. After that the last answers have the
    route timeout to come."""
    import queue

    more: "queue.Queue[pb.ModelInferRequest | None]" = queue.Queue()

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (req := more.get()) is not None:
            yield req

    with grpc.insecure_channel(short_timeout_gateway) as ch:
        answers = pbg.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(), metadata=[("mm-vmodel-id", "m0")], timeout=30)
        got = []
        t0 = time.monotonic()
        for i in range(10):
            more.put(pb.ModelInferRequest(model_name="m0", id=str(i)))
            got.append(next(answers).infer_response.id)
            time.sleep(0.3)
        more.put(None)
        assert list(answers) == [] and got == ["pod-0"] * 10 and time.monotonic() - t0 > 3
