"""Issue 8: OpenTelemetry traces over the cache-miss path and the control actions.

Kind: integration, real servers. A real Valkey (devmesh.valkey()), the real Scheduler (leader),
Activator (its REST app on 127.0.0.1) and loader Agent in this process, and a real built-in
runtime process (run by the agent's RuntimeProcess, as in tests/test_loader_agent.py, always
stopped). One in-memory exporter (tracing.setup(..., simple=True)) collects every component's
spans. A cold REST request must make one trace:

    activator.request
      activator.hold            (its context rides on ms:loadreq)
        placement.decide        (the leader; its context rides on the order, ms:orders:pod-0)
          loader.pull
          loader.load           (the result on ms:events carries the decision's context)
      activator.forward         (the first inference, on pod-0)

Requests that wait on the same load link to the hold span that asked for it, log lines on the
path carry trace_id and model, and `meshserve apply / promote / rollback` (and `up`'s apply)
make control spans.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshserve import tracing
from meshserve_testing import devmesh
from meshserve.store import State, keys
from meshserve.model import ModelSpec, Pod
from meshserve.settings import Settings
from meshserve_loader.agent import Agent
from meshserve_loader.example_models import write_sklearn
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers.builtin import RuntimeClient, builtin_argv, read_ports
from meshserve_placement.activator import Activator, build_rest_app
from meshserve_placement.activator_grpc import GrpcActivator
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_placement.leader import Scheduler

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures"
EXAMPLES = REPO / "mesh-config" / "examples"
MODEL = "mnist__isvc-00000000aa"
MODEL2 = "mnist2__isvc-00000000bb"
MODEL3 = "mnist3__isvc-00000000cc"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    tracing.setup("meshserve-test", exp, simple=True)
    yield exp


@pytest.fixture(scope="module")
def valkey() -> Iterator[devmesh.Valkey]:
    with devmesh.valkey() as v:
        yield v


class Records(logging.Handler):
    """Log records as a real handler sees them: through TraceLogFilter (as logs.setup does)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(tracing.TraceLogFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    h = Records()
    logger = logging.getLogger("meshserve")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(h)
    try:
        yield h
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


@dataclass
class Endpoints:
    rest: str  # the activator's REST base URL
    grpc: str  # its gRPC host:port


@pytest.fixture
async def mesh(valkey: devmesh.Valkey, tmp_path: Path) -> AsyncIterator[Endpoints]:
    """The cold path, for real: runtime process + agent, leader, activator (REST and gRPC)."""
    s = Settings(data_dir=tmp_path, redis_url=valkey.url, runtime_base_port=0, heartbeat_seconds=0.5,
                 lease_seconds=1.0, cold_start_timeout_seconds=30.0, load_timeout_seconds=30.0)
    write_sklearn(tmp_path / "pvc" / "vol" / "mnist-svm.joblib")
    env = {k: v for k, v in s.as_env().items() if k in ("MESHSERVE_RUNTIME_BASE_PORT", "MESHSERVE_HOST", "MESHSERVE_DATA_DIR")}
    proc = RuntimeProcess("builtin", builtin_argv(0, tmp_path / "ports.json"), env, log_path=tmp_path / "runtime.log")
    state = State.from_url(valkey.url)  # connects on first use
    tasks: list[asyncio.Task[Any]] = []
    runner: web.AppRunner | None = None
    gsrv: grpc.aio.Server | None = None
    storage = {"parameters": {"type": "pvc", "name": "vol"}, "path": "mnist-svm.joblib"}
    await proc.start()
    try:
        ports = await read_ports(tmp_path / "ports.json", proc)  # it binds port 0 and says what it got
        await state.r.flushdb()
        async with aiohttp.ClientSession() as session:
            try:
                rt = RuntimeClient(f"http://127.0.0.1:{ports['control']}", session)
                agent = Agent(s, Pod("pod-0", "127.0.0.1", ports["rest"], ports["grpc"], 1 << 30, ["sklearn"], max_loading=2,
                                   awaits_loads=True), rt, state)
                await rt.wait_ready(60)
                await agent.register()
                sched = Scheduler(s, state)
                act = Activator(s, state)
                tasks = [asyncio.create_task(c) for c in (agent.heartbeat_loop(), agent.usage_loop(), agent.order_loop(), sched.run(), act.watch_changes())]
                await asyncio.wait_for(sched.leading.wait(), 10)
                await state.register_models([ModelSpec(id=m, alias=m.split("__")[0], format="sklearn", storage=storage)
                                             for m in (MODEL, MODEL2, MODEL3)])
                runner = web.AppRunner(build_rest_app(act, session), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                port = runner.addresses[0][1]
                gsrv = grpc.aio.server()
                gsrv.add_generic_rpc_handlers((GrpcActivator(act),))
                gport = gsrv.add_insecure_port("127.0.0.1:0")
                await gsrv.start()
                yield Endpoints(f"http://127.0.0.1:{port}", f"127.0.0.1:{gport}")
            finally:
                if gsrv is not None:
                    await gsrv.stop(0)
                for t in tasks:
                    t.cancel()
                # Bounded: a task cancelled inside a blocking redis read can stay "cancelling"
                # (redis-py's asyncio client); closing the client below ends it.
                if tasks:
                    await asyncio.wait(tasks, timeout=5)
                if runner is not None:
                    await runner.cleanup()
    finally:
        await proc.stop()
        await state.close()


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: list[ReadableSpan], name: str, trace_id: int) -> ReadableSpan:
    found = [s for s in by_name(spans, name) if s.context.trace_id == trace_id]
    assert len(found) == 1, f"{name} in trace {trace_id:032x}: {[(s.name, s.attributes) for s in found]}"
    return found[0]


def carried(fields: dict[bytes, bytes]) -> tuple[int, int]:
    """(trace id, span id) of the context a stream entry carries."""
    assert b"traceparent" in fields, fields
    ctx = trace.get_current_span(tracing.extract(fields)).get_span_context()
    return ctx.trace_id, ctx.span_id


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.span_id


async def test_cold_request_is_one_trace_across_activator_leader_and_loader(
    exporter: InMemorySpanExporter, records: Records, mesh: Endpoints, valkey: devmesh.Valkey
) -> None:
    exporter.clear()
    body = json.loads((FIXTURES / "mnist-request-v2-rest.json").read_text())
    async with aiohttp.ClientSession() as http:

        async def infer() -> tuple[int, str]:
            async with http.post(f"{mesh.rest}/v2/models/mnist/infer", json=body) as r:
                return r.status, await r.text()

        # Three at once: the first to get there asks for the load; the others wait on it.
        results = await asyncio.gather(infer(), infer(), infer())
    for status, text in results:
        assert status == 200, text

    spans = list(exporter.get_finished_spans())
    # The one trace with the load in it: the request whose hold wrote ms:loadreq.
    (decide,) = [s for s in by_name(spans, "placement.decide") if s.attributes.get("meshserve.outcome") == "placed"]
    tid = decide.context.trace_id
    request = one(spans, "activator.request", tid)
    hold = one(spans, "activator.hold", tid)
    pull = one(spans, "loader.pull", tid)
    load = one(spans, "loader.load", tid)
    forward = one(spans, "activator.forward", tid)

    # Parent links: request -> hold -> decide -> pull, load; request -> forward.
    assert request.parent is None and request.kind == SpanKind.SERVER
    assert parent_of(hold) == request.context.span_id
    assert parent_of(decide) == hold.context.span_id and decide.parent.is_remote  # type: ignore[union-attr]
    assert parent_of(pull) == decide.context.span_id and pull.parent.is_remote  # type: ignore[union-attr]
    assert parent_of(load) == decide.context.span_id
    assert parent_of(forward) == request.context.span_id and forward.kind == SpanKind.CLIENT
    # In time order: hold, then the decision, the pull, the load; the forward after the hold.
    # Sent ahead (activator.py), the hold ends once the copy is placed and the forward waits on
    # the pod for the load; otherwise the hold ends after the load.
    assert hold.start_time < decide.start_time < pull.start_time <= pull.end_time <= load.start_time < load.end_time
    assert hold.end_time <= forward.start_time and forward.end_time <= request.end_time
    if hold.attributes.get("meshserve.sent_ahead"):
        assert hold.end_time < load.end_time <= forward.end_time
    else:
        assert load.end_time <= hold.end_time

    for s in (request, hold, decide, pull, load, forward):
        assert s.attributes.get(tracing.ATTR_MODEL) == MODEL, (s.name, s.attributes)
        assert s.status.status_code != StatusCode.ERROR, (s.name, s.status)
    for s in (hold, decide, pull, load, forward):
        assert s.attributes.get(tracing.ATTR_POD) == "pod-0", (s.name, s.attributes)
    assert hold.attributes.get("meshserve.load_requested") is True
    assert pull.attributes.get("meshserve.source") == "local"
    assert load.attributes.get("meshserve.measured_bytes", 0) > 0
    assert forward.attributes.get("http.response.status_code") == 200

    # The other two requests are traces of their own; their holds link to the one that asked.
    others = [s for s in by_name(spans, "activator.hold") if s.context.trace_id != tid]
    assert len(others) == 2, [(s.name, s.attributes) for s in others]
    for h in others:
        assert [link.context.span_id for link in h.links] == [hold.context.span_id], h.links
        assert one(spans, "activator.forward", h.context.trace_id).attributes.get(tracing.ATTR_POD) == "pod-0"
    assert len(by_name(spans, "loader.load")) == 1  # many requests, one load

    # The context crossed Redis as stream fields: the load request carried the hold's, the
    # loader's result event the decision's.
    state = State.from_url(valkey.url)
    try:
        reqs = [f for _, f in await state.r.xrange(keys.LOAD_REQUESTS)]
        events = [f for _, f in await state.r.xrange(keys.EVENTS) if f.get(b"op") == b"load"]
    finally:
        await state.close()
    assert [carried(f) for f in reqs] == [(tid, hold.context.span_id)]
    assert [carried(f) for f in events] == [(tid, decide.context.span_id)]

    # Log lines about the model, on the path, carry its trace id and model id.
    def logged(prefix: str) -> logging.LogRecord:
        found = [r for r in records.records if r.getMessage().startswith(prefix)]
        assert found, f"no log line starting {prefix!r}: {[r.getMessage() for r in records.records]}"
        return found[0]

    for line in (f"placing {MODEL} on pod-0", f"load of {MODEL} done"):
        r = logged(line)
        assert getattr(r, "trace_id", None) == f"{tid:032x}", (line, r.__dict__)
        assert getattr(r, "model", None) == MODEL, (line, r.__dict__)

    # A request that arrives with a W3C traceparent (a traced client, or Envoy) stays in its trace,
    # all the way to the load.
    exporter.clear()
    caller_trace, caller_span = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mesh.rest}/v2/models/mnist2/infer", json=body,
                             headers={"Traceparent": f"00-{caller_trace:032x}-{caller_span:016x}-01"}) as r:
            assert r.status == 200, await r.text()
        spans = list(exporter.get_finished_spans())
        request = one(spans, "activator.request", caller_trace)
        assert request.parent is not None and request.parent.span_id == caller_span and request.parent.is_remote
        assert one(spans, "loader.load", caller_trace).attributes.get(tracing.ATTR_MODEL) == MODEL2

        # An unknown model: a request span (404 is the caller's error, not ours), no hold.
        exporter.clear()
        async with http.post(f"{mesh.rest}/v2/models/nosuch/infer", json=body) as r:
            assert r.status == 404
    spans = list(exporter.get_finished_spans())
    (request,) = by_name(spans, "activator.request")
    assert request.attributes.get("http.response.status_code") == 404 and request.status.status_code != StatusCode.ERROR
    assert not by_name(spans, "activator.hold")

    # gRPC: the same tree, and a caller's traceparent in the metadata is continued.
    exporter.clear()
    req = pb.ModelInferRequest(model_name="mnist3", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="predict", datatype="FP32", shape=[1, 64], contents=pb.InferTensorContents(fp32_contents=body["inputs"][0]["data"]))])
    async with grpc.aio.insecure_channel(mesh.grpc) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                              response_deserializer=pb.ModelInferResponse.FromString)
        resp = await call(req, metadata=[("traceparent", f"00-{caller_trace:032x}-{caller_span:016x}-01")], timeout=30)
    assert resp.model_name == MODEL3 and resp.outputs
    spans = list(exporter.get_finished_spans())
    request = one(spans, "activator.request", caller_trace)
    hold, decide = one(spans, "activator.hold", caller_trace), one(spans, "placement.decide", caller_trace)
    load, forward = one(spans, "loader.load", caller_trace), one(spans, "activator.forward", caller_trace)
    assert request.attributes.get("meshserve.protocol") == "grpc" and request.parent.span_id == caller_span  # type: ignore[union-attr]
    assert parent_of(hold) == request.context.span_id and parent_of(decide) == hold.context.span_id
    assert parent_of(load) == decide.context.span_id and parent_of(forward) == request.context.span_id
    assert forward.attributes.get(tracing.ATTR_POD) == "pod-0" and forward.attributes.get(tracing.ATTR_MODEL) == MODEL3
    assert all(s.status.status_code != StatusCode.ERROR for s in spans), [(s.name, s.status) for s in spans]


def test_control_actions_make_control_spans(exporter: InMemorySpanExporter, valkey: devmesh.Valkey, tmp_path: Path) -> None:
    """Kind: integration (real Valkey, the CLI in-process as tests/test_rules.py runs it)."""
    from click.testing import CliRunner

    from meshserve.apply import apply_path
    from meshserve.cli import cli

    async def flush_and_apply_up() -> None:
        state = State.from_url(valkey.url)
        try:
            await state.r.flushdb()
            await apply_path(state, REPO / "mesh-config")  # what `meshserve up` does at start
        finally:
            await state.close()

    exporter.clear()
    asyncio.run(flush_and_apply_up())
    canary = tmp_path / "canary.yaml"
    canary.write_text((EXAMPLES / "progressive-canary.yaml").read_text().replace("hold: 5m", "hold: 1h"))
    run = CliRunner()
    env = {"MESHSERVE_REDIS_URL": valkey.url}
    res = run.invoke(cli, ["apply", "-f", str(EXAMPLES / "models.yaml"), "-f", str(canary)], env=env)
    assert res.exit_code == 0, res.output
    res = run.invoke(cli, ["promote", "sklearn-mnist-canary"], env=env)
    assert res.exit_code == 0, res.output
    res = run.invoke(cli, ["rollback", "sklearn-mnist-canary"], env=env)
    assert res.exit_code == 0, res.output
    res = run.invoke(cli, ["rollback", "nope"], env=env)
    assert res.exit_code == 1
    run.invoke(cli, ["get", "rules"], env=env)  # a read: no span

    spans = list(exporter.get_finished_spans())
    assert [s.name for s in spans] == ["control.apply", "control.apply", "control.promote", "control.rollback", "control.rollback"]
    up, apply, promote, rollback, failed = spans
    assert len({s.context.trace_id for s in spans}) == 5 and all(s.parent is None for s in spans)
    assert up.attributes.get("meshserve.by") == "up" and any(m.startswith("sklearn-mnist__isvc-") for m in up.attributes["meshserve.models"])
    assert apply.attributes["meshserve.files"] == (str(EXAMPLES / "models.yaml"), str(canary))
    assert apply.attributes["meshserve.rules"] == ("sklearn-mnist-canary",) and apply.attributes["meshserve.rule_count"] == 1
    assert apply.attributes["meshserve.model_count"] == len(apply.attributes["meshserve.models"]) >= 1
    for s in (promote, rollback):
        assert s.attributes.get("meshserve.name") == "sklearn-mnist-canary"
        assert s.attributes.get("meshserve.kind") == "trafficrule" and s.attributes.get(tracing.ATTR_MODEL) == "sklearn-mnist"
        assert s.status.status_code != StatusCode.ERROR
    assert failed.attributes.get("meshserve.name") == "nope" and failed.status.status_code == StatusCode.ERROR
