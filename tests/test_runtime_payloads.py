"""ModelMesh's payload processors (MM_PAYLOAD_PROCESSORS) in the built-in runtime.

Kind: unit for the definitions (pure parsing, as kserve/modelmesh `ModelMesh.initPayloadProcessor`
and `MatchingPayloadProcessor.from` read them); real servers for the rest: the built-in runtime
as its own process (`python -m meshserve_loader.builtin`, ports bound to 0 on 127.0.0.1,
configured only by ModelMesh's environment variable) and, as the processor, an HTTP server of
this test's that records what it is sent, in the JSON shape of ModelMesh's
RemotePayloadProcessor (id, modelid, vModelId, kind, data, status, metadata)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import grpc
import pytest
from aiohttp import web

from meshserve_loader.builtin.payloads import Processor, from_env, parse
from meshserve_loader.example_models import write_sklearn
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

MODEL = "sklearn-mnist__isvc-0000000001"
FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    if not FIXTURES.exists():
        pytest.skip("../shared/fixtures is not beside the repository")
    return FIXTURES


def test_definitions_are_read_as_modelmesh_reads_them(caplog: pytest.LogCaptureFixture) -> None:
    got = parse("http://10.10.10.1:8080/consumer/kserve/v2  logger:///*?pytorch1234#predict "
                "https://t.example/c?m1 logger://* ftp://x/y http:///nohost")
    assert got == [
        Processor("remote", "http://10.10.10.1:8080/consumer/kserve/v2"),
        Processor("logger", "", "pytorch1234", "predict"),
        Processor("remote", "https://t.example/c?m1", "m1"),
        Processor("logger"),
    ]
    assert "no processor for scheme 'ftp'" in caplog.text and "names no host" in caplog.text
    assert parse("") == [] and parse("   ") == []
    assert Processor("logger", "", "a", None).takes("a", "m") and not Processor("logger", "", "a", None).takes("b", "m")
    # MESHSERVE_PAYLOAD_PROCESSORS first, else ModelMesh's variables; a bad size says which.
    assert from_env({"MM_PAYLOAD_PROCESSORS": ""}, "") is None
    sink = from_env({"MM_PAYLOAD_PROCESSORS": "logger://*", "MM_PAYLOAD_PROCESSORS_CAPACITY": "8"}, "")
    assert sink is not None and (sink.capacity, sink.workers, sink.processors) == (8, 2, [Processor("logger")])
    assert from_env({"MM_PAYLOAD_PROCESSORS": "logger://*"}, "http://a/b").processors == [Processor("remote", "http://a/b")]
    with pytest.raises(SystemExit, match="MM_PAYLOAD_PROCESSORS_THREADS='two'"):
        from_env({"MM_PAYLOAD_PROCESSORS": "logger://*", "MM_PAYLOAD_PROCESSORS_THREADS": "two"}, "")


class Consumer:
    """The processor's side: records each payload; answers `status`."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.got.append(await request.json())
        return web.Response(status=self.status)

    async def wait_for(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.got) >= n, self.got
        return self.got[:n]


@pytest.fixture
async def consumer() -> AsyncIterator[tuple[Consumer, str]]:
    c = Consumer()
    app = web.Application()
    app.router.add_post("/consumer/kserve/v2", c.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield c, f"http://127.0.0.1:{runner.addresses[0][1]}/consumer/kserve/v2"
    finally:
        await runner.cleanup()


async def _runtime(tmp_path: Path, processors: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = tmp_path / "ports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "MM_"))}
    env.update({"MESHSERVE_RUNTIME_BASE_PORT": "0", "MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_DATA_DIR": str(tmp_path / "data"),
                "MESHSERVE_MODEL_ROOTS": str(tmp_path), "MESHSERVE_LOG_JSON": "false", "MM_PAYLOAD_PROCESSORS": processors})
    p = subprocess.Popen([sys.executable, "-m", "meshserve_loader.builtin", "--index", "0", "--ports-file", str(ports)], env=env,
                         stdout=open(tmp_path / "runtime.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ports.exists() and time.monotonic() < deadline:
        assert p.poll() is None, (tmp_path / "runtime.log").read_text()
        await asyncio.sleep(0.05)
    bound = json.loads(ports.read_text())
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{bound['control']}/v2/repository/models/{MODEL}/load",
                          json={"parameters": {"path": str(write_sklearn(tmp_path / "mnist-svm.joblib")), "format": "sklearn",
                                               "timeout_seconds": 60}}) as r:
            assert r.status == 200, await r.text()
    return p, bound


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _grpc_request(fixtures: Path) -> pb.ModelInferRequest:
    doc = json.loads((fixtures / "mnist-request-v2-rest.json").read_text())["inputs"][0]
    req = pb.ModelInferRequest(model_name="sklearn-mnist", id="req-7")
    inp = req.inputs.add(name=doc["name"], datatype="FP32", shape=doc["shape"])
    inp.contents.fp32_contents.extend(doc["data"])
    return req


async def test_each_inference_reaches_the_processor_as_modelmesh_sends_it(tmp_path: Path, fixtures: Path,
                                                                         consumer: tuple[Consumer, str]) -> None:
    c, url = consumer
    p, bound = await _runtime(tmp_path, url)
    try:
        body = (fixtures / "mnist-request-v2-rest.json").read_bytes()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{bound['rest']}/v2/models/{MODEL}/infer", data=body,
                              headers={"Content-Type": "application/json", "Authorization": "Bearer secret", "x-tenant": "acme"}) as r:
                assert r.status == 200 and (await r.json())["outputs"][0]["data"] == [8]
        req_p, resp_p = await c.wait_for(2)
        assert set(req_p) == {"id", "modelid", "vModelId", "kind", "data", "status", "metadata"}
        assert (req_p["kind"], resp_p["kind"], req_p["modelid"], req_p["status"], resp_p["status"]) == ("request", "response", MODEL, "", "OK")
        assert req_p["id"] == resp_p["id"] and req_p["vModelId"] is None
        # The REST request as the gRPC message ModelMesh's REST proxy would have made of it.
        sent = pb.ModelInferRequest.FromString(base64.b64decode(req_p["data"]))
        doc = json.loads(body)["inputs"][0]
        assert (sent.model_name, sent.inputs[0].name, list(sent.inputs[0].shape)) == (MODEL, "predict", [1, 64])
        assert list(sent.inputs[0].contents.fp32_contents) == doc["data"]
        answered = pb.ModelInferResponse.FromString(base64.b64decode(resp_p["data"]))
        assert list(answered.outputs[0].contents.int64_contents) == [8]
        # Headers go along, credentials do not.
        assert req_p["metadata"]["x-tenant"] == "acme" and "authorization" not in req_p["metadata"]

        # gRPC: the bytes exactly as the client sent them, the answer exactly as it got it.
        c.got.clear()
        req = _grpc_request(fixtures)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bound['grpc']}") as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            out = await stub.ModelInfer(req, metadata=[("mm-model-id", MODEL)], timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as miss:
                await stub.ModelInfer(req, metadata=[("mm-model-id", "nope__isvc-0000000009")], timeout=30)
            assert miss.value.code() == grpc.StatusCode.NOT_FOUND
        got = await c.wait_for(4)
        by = {(g["modelid"], g["kind"]): g for g in got}
        assert base64.b64decode(by[(MODEL, "request")]["data"]) == req.SerializeToString()
        assert base64.b64decode(by[(MODEL, "response")]["data"]) == out.SerializeToString()
        assert by[(MODEL, "response")]["status"] == "OK" and by[(MODEL, "request")]["metadata"]["mm-model-id"] == MODEL
        missed = by[("nope__isvc-0000000009", "response")]
        assert (missed["status"], missed["data"]) == ("NOT_FOUND", "")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{bound['rest']}/metrics") as r:
            assert 'meshserve_runtime_payloads_total{outcome="sent"} 6.0' in await r.text()
    finally:
        _stop(p)


async def test_a_processor_that_is_down_or_filtered_out_costs_the_request_nothing(tmp_path: Path, fixtures: Path,
                                                                                 consumer: tuple[Consumer, str]) -> None:
    c, url = consumer
    # One processor nobody listens on (port 9 of 127.0.0.1 refuses), one that watches another model.
    p, bound = await _runtime(tmp_path, f"http://127.0.0.1:9/consumer {url}?other-model__isvc-0000000002")
    try:
        body = (fixtures / "mnist-request-v2-rest.json").read_bytes()
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.post(f"http://127.0.0.1:{bound['rest']}/v2/models/{MODEL}/infer", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 200 and (await r.json())["outputs"][0]["data"] == [8]
            deadline = time.monotonic() + 20
            text = ""
            while 'outcome="failed"} 10.0' not in text and time.monotonic() < deadline:
                async with s.get(f"http://127.0.0.1:{bound['rest']}/metrics") as r:
                    text = await r.text()
                await asyncio.sleep(0.1)
        assert 'meshserve_runtime_payloads_total{outcome="failed"} 10.0' in text  # 5 requests, 2 payloads each
        assert c.got == []  # the filter: not this model
        assert p.poll() is None
    finally:
        _stop(p)


def test_a_rest_request_becomes_the_grpc_message_that_decodes_to_it() -> None:
    """Unit: what the processors get for REST decodes back to the request, typed contents or,
    when a datatype has no contents field (FP16, BF16), raw for every input."""
    import numpy as np

    from meshserve_loader.builtin import binary, codec

    typed = codec.decode_json_request(json.dumps({"id": "r1", "inputs": [
        {"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]},
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]}], "outputs": [{"name": "y"}]}).encode())
    msg = binary.grpc_request("m", typed)
    assert (msg.model_name, msg.id, [o.name for o in msg.outputs], msg.raw_input_contents) == ("m", "r1", ["y"], [])
    assert list(msg.inputs[0].contents.int_contents) == [1, 2] and list(msg.inputs[1].contents.bytes_contents) == [b"hi"]
    raw = codec.decode_json_request(json.dumps({"inputs": [
        {"name": "h", "shape": [2], "datatype": "FP16", "data": [0.5, -2.0]},
        {"name": "b", "shape": [2], "datatype": "BF16", "data": [1.5, 3.0]},
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}).encode())
    back = codec.decode_grpc_request(pb.ModelInferRequest.FromString(binary.grpc_request("m", raw).SerializeToString()))
    for a, b in zip(raw.inputs, back.inputs):
        assert a.datatype == b.datatype and np.array_equal(a.array, b.array), a.name
