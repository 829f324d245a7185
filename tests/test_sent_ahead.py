"""A cold request (REST or gRPC) sent ahead of its model's load (activator.py "Sent ahead"): the activator
forwards it to the pod loading the model, whose runtime holds it until the load ends. The
client's answer then needs neither the load's result in Redis nor the leader's commit; a copy
that fails before the runtime got its load releases the request at once with the reason.

Kind: integration. Real Valkey for the state, the built-in runtime's real REST app and the
activator's real REST app on 127.0.0.1 (aiohttp test servers), a real sklearn model file. No
leader and no loader: the test writes the copies as the leader would and drives the runtime's
load as the loader would."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meshserve.headers import AWAIT_LOAD_HEADER, MODEL_ID_HEADER
from meshserve.model import Copy, CopyState, Pod
from meshserve.settings import Settings
from meshserve.store import State
from meshserve.store import keys as k
from meshserve.store import ops
from meshserve.store.messages import KIND_PLACEMENT
from meshserve_loader import example_models as ex
from meshserve_loader.builtin import http_api
from meshserve_loader.builtin.grpc_api import GrpcServicer, add_servicer
from meshserve_loader.builtin.table import Runtime
from meshserve_placement.activator import Activator, build_rest_app
from meshserve_placement.activator_grpc import GrpcActivator
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

ROW = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[Runtime, int]]:
    """The runtime's data app served as `server.serve` serves it: aiohttp's AppRunner, which
    does not cancel a handler whose client left (a test server would)."""
    rt = Runtime()
    runner = web.AppRunner(http_api.build_rest_app(rt), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield rt, runner.addresses[0][1]
    finally:
        await runner.cleanup()
        rt.close()


@pytest.fixture
async def gateway(state: State, runtime: tuple[Runtime, int]) -> AsyncIterator[tuple[Activator, str, Pod]]:
    """The activator's REST app over `state`, and the runtime registered as pod p0."""
    act = Activator(Settings(cold_start_timeout_seconds=10), state)
    pod = Pod("p0", "127.0.0.1", runtime[1], 1, 1 << 30, runtime="builtin", awaits_loads=True)
    await ops.register_pod(state, pod)
    watcher = asyncio.create_task(act.watch_changes())
    async with aiohttp.ClientSession() as session:
        server = TestServer(build_rest_app(act, session), host="127.0.0.1")
        await server.start_server()
        await asyncio.sleep(0.1)  # the watcher's first XREAD is out
        try:
            yield act, f"http://127.0.0.1:{server.port}", pod
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await server.close()


async def _set_copy(state: State, model: str, pod: str, copy: Copy) -> None:
    await state.commit([ops.set_copies(model, {pod: copy})], [(KIND_PLACEMENT, model)])


async def _register(state: State, model: str) -> None:
    await state.r.hset(k.ALIASES, model, model)  # name -> id, as the registry writes it


async def _placed_and_held(state: State, rt: Runtime, model: str, pod: str = "p0") -> None:
    """Commit the copy LOADING on `pod` (the leader's order) and wait until the runtime holds the
    request the activator sent ahead."""
    await _set_copy(state, model, pod, Copy(CopyState.LOADING, 1, time.time()))
    for _ in range(100):
        if rt._awaiting == 1:
            break
        await asyncio.sleep(0.02)
    assert rt._awaiting == 1


async def _nothing_held(rt: Runtime) -> None:
    """The runtime holds nothing (a dropped forward is seen within AWAIT_CHECK_SECONDS)."""
    for _ in range(50):
        if rt._awaiting == 0:
            break
        await asyncio.sleep(0.02)
    assert rt._awaiting == 0 and rt._arrivals == {}


async def test_a_request_sent_ahead_is_answered_when_the_load_lands_without_its_result(
        state: State, runtime: tuple[Runtime, int], gateway: tuple[Activator, str, Pod], tmp_path: Path) -> None:
    rt, _ = runtime
    _, url, _ = gateway
    model = ex.write_sklearn(tmp_path / "mnist.joblib")
    await _register(state, "m")
    async with aiohttp.ClientSession() as c:
        req = asyncio.create_task(c.post(f"{url}/v2/models/m/infer", json=ROW))
        await asyncio.sleep(0.2)
        await _placed_and_held(state, rt, "m")  # the leader's order; the activator sent it ahead
        assert not req.done()
        t0 = time.monotonic()
        await rt.load("m", "sklearn", str(model), {})  # the loader's load; no result, no commit
        r = await asyncio.wait_for(req, 5)
        assert r.status == 200, await r.text()
        assert (await r.json())["outputs"][0]["shape"] == [1, 1]
        assert time.monotonic() - t0 < 1.0
    # Redis still says LOADING: the answer came without the load's result coming round.
    assert (await state.copies("m"))["p0"].state == CopyState.LOADING
    assert rt._awaiting == 0 and rt._arrivals == {}
    act = gateway[0]  # and the activator keeps nothing for the model once its request is done
    assert act._holding == {} and act._waiters == {} and act._requested_by == {} and act._loaded_on == {}


async def test_a_copy_that_fails_before_the_pod_loads_releases_the_request_with_the_reason(
        state: State, runtime: tuple[Runtime, int], gateway: tuple[Activator, str, Pod]) -> None:
    rt, _ = runtime
    _, url, _ = gateway
    await _register(state, "m")
    async with aiohttp.ClientSession() as c:
        req = asyncio.create_task(c.post(f"{url}/v2/models/m/infer", json=ROW))
        await asyncio.sleep(0.2)
        await _placed_and_held(state, rt, "m")  # the leader's order; the activator sent it ahead
        t0 = time.monotonic()
        # The loader could not fetch the files: the runtime never hears of this load.
        await _set_copy(state, "m", "p0", Copy(CopyState.FAILED, 0, time.time(), "storage: NoSuchKey: s3://b/m"))
        r = await asyncio.wait_for(req, 5)
        assert time.monotonic() - t0 < 1.5
        assert r.status == 503 and "m" in (await r.json())["error"]
    await _nothing_held(rt)


async def test_a_pod_that_dies_holding_a_request_sent_ahead_sends_it_back_to_wait(
        state: State, runtime: tuple[Runtime, int], tmp_path: Path) -> None:
    """The loader killed mid-load (e2e/faults test_loader_killed_mid_download): the runtime
    holding the request goes with it, the connection breaks before any answer, and the request
    waits for a copy again instead of getting a 503. Pod p0 is a socket that takes the request
    and closes; p1 is a real runtime that loads the model once placement moves the copy there."""
    rt, port = runtime
    model = ex.write_sklearn(tmp_path / "mnist.joblib")
    arrived, die = asyncio.Event(), asyncio.Event()

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        arrived.set()
        await die.wait()
        writer.close()

    dead = await asyncio.start_server(dying, "127.0.0.1", 0)
    act = Activator(Settings(cold_start_timeout_seconds=10), state)
    for pod in (Pod("p0", "127.0.0.1", dead.sockets[0].getsockname()[1], 1, 1 << 30, runtime="builtin", awaits_loads=True),
                Pod("p1", "127.0.0.1", port, 1, 1 << 30, runtime="builtin", awaits_loads=True)):
        await ops.register_pod(state, pod)
    await _register(state, "m")
    watcher = asyncio.create_task(act.watch_changes())
    try:
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as c:
            server = TestServer(build_rest_app(act, session), host="127.0.0.1")
            await server.start_server()
            await asyncio.sleep(0.1)
            req = asyncio.create_task(c.post(f"http://127.0.0.1:{server.port}/v2/models/m/infer", json=ROW))
            await asyncio.sleep(0.2)
            await _set_copy(state, "m", "p0", Copy(CopyState.LOADING, 1, time.time()))
            await asyncio.wait_for(arrived.wait(), 5)  # sent ahead to p0
            die.set()
            await asyncio.sleep(0.3)
            assert not req.done()  # waiting again, not a 503
            await rt.load("m", "sklearn", str(model), {})  # placed on p1 and loaded there
            await state.commit([ops.set_copies("m", {"p1": Copy(CopyState.LOADED, 1, time.time())})], [(KIND_PLACEMENT, "m")])
            r = await asyncio.wait_for(req, 5)
            assert r.status == 200, await r.text()
            await server.close()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        dead.close()


async def test_the_runtime_holds_a_request_for_a_load_no_longer_than_it_may(runtime: tuple[Runtime, int], tmp_path: Path) -> None:
    """The runtime alone: a hold ends with the load (served), with a failed load (404 at once),
    or with its time (404); a header that is not a positive number holds nothing."""
    rt, port = runtime
    base = f"http://127.0.0.1:{port}/v2/models/m/infer"
    model = ex.write_sklearn(tmp_path / "mnist.joblib")

    async def post(c: aiohttp.ClientSession, wait: str) -> tuple[int, float]:
        t0 = time.monotonic()
        async with c.post(base, json=ROW, headers={MODEL_ID_HEADER: "m", AWAIT_LOAD_HEADER: wait}) as r:
            await r.read()
            return r.status, time.monotonic() - t0

    async with aiohttp.ClientSession() as c:
        for bad in ("nan", "-1", "soon", "0"):
            status, took = await post(c, bad)
            assert status == 404 and took < 0.5, bad
        status, took = await post(c, "0.3")  # nothing loads it
        assert status == 404 and 0.3 <= took < 1.5
        held = asyncio.create_task(post(c, "10"))
        await asyncio.sleep(0.2)
        with pytest.raises(Exception):
            await rt.load("m", "sklearn", str(tmp_path / "missing.joblib"), {})
        status, took = await asyncio.wait_for(held, 9)
        assert status == 404 and took < 6.0  # the failed load ended the 10 s hold
        held = asyncio.create_task(post(c, "10"))
        await asyncio.sleep(0.2)
        await rt.load("m", "sklearn", str(model), {})
        status, took = await asyncio.wait_for(held, 9)
        assert status == 200 and took < 6.0  # the load ended the 10 s hold
    assert rt._awaiting == 0 and rt._arrivals == {}


async def test_a_grpc_call_is_sent_ahead_too_and_a_failed_copy_is_unavailable_with_its_reason(
        state: State, runtime: tuple[Runtime, int], tmp_path: Path) -> None:
    """The same over gRPC: the activator's gRPC front forwards a ModelInfer to the loading pod's
    gRPC port with the header as metadata; the runtime holds it until the load lands."""
    rt, _ = runtime
    model = ex.write_sklearn(tmp_path / "mnist.joblib")
    rsrv = grpc.aio.server()
    add_servicer(rsrv, GrpcServicer(rt))
    rport = rsrv.add_insecure_port("127.0.0.1:0")
    await rsrv.start()
    act = Activator(Settings(cold_start_timeout_seconds=10), state)
    await ops.register_pod(state, Pod("p0", "127.0.0.1", 1, rport, 1 << 30, runtime="builtin", awaits_loads=True))
    watcher = asyncio.create_task(act.watch_changes())
    asrv = grpc.aio.server()
    asrv.add_generic_rpc_handlers((GrpcActivator(act),))
    aport = asrv.add_insecure_port("127.0.0.1:0")
    await asrv.start()
    await _register(state, "m")
    await _register(state, "f")
    req = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 64], contents=pb.InferTensorContents(fp32_contents=[0.0] * 64))])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{aport}") as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            call = asyncio.ensure_future(stub.ModelInfer(req, metadata=[("mm-vmodel-id", "m")], timeout=10))
            await asyncio.sleep(0.2)
            await _placed_and_held(state, rt, "m")  # the leader's order; the activator sent it ahead
            assert not call.done()
            await rt.load("m", "sklearn", str(model), {})  # no result, no commit
            resp = await asyncio.wait_for(call, 5)
            assert resp.model_name == "m" and list(resp.outputs[0].shape) == [1, 1]

            req.model_name = "f"
            call = asyncio.ensure_future(stub.ModelInfer(req, metadata=[("mm-vmodel-id", "f")], timeout=10))
            await asyncio.sleep(0.2)
            await _placed_and_held(state, rt, "f")  # the leader's order; the activator sent it ahead
            await _set_copy(state, "f", "p0", Copy(CopyState.FAILED, 0, time.time(), "storage: NoSuchKey: s3://b/f"))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(call, 5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "'f'" in (e.value.details() or "")
        await _nothing_held(rt)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asrv.stop(0)
        await rsrv.stop(0)
