"""MLServer 1.7.1 as a runtime, through the KServe v2 repository API.

Kind: e2e. A real MLServer process from its own venv (created once under .venv-mlserver/ by
`ensure_mlserver`, a few minutes the first time: it is never skipped), started and stopped by
our RuntimeProcess; and a whole mesh (real Envoy, Valkey) whose pod runs MLServer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path


import aiohttp
import pytest

from meshserve_testing import devmesh
from meshserve_loader.example_models import write_sklearn
from meshserve_loader.memory import tree_rss_bytes
from meshserve_loader.servers.mlserver import MLServerClient, start_mlserver
from meshserve_loader.servers.mlserver_venv import ensure_mlserver

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mlserver_exe() -> Path:
    return ensure_mlserver(REPO)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sklearn(tmp_path_factory.mktemp("models") / "mnist-svm.joblib")


def _v2_request(fixtures: Path) -> dict:
    return json.loads((fixtures / "mnist-request-v2-rest.json").read_text())


async def test_load_infer_unload_and_failures(mlserver_exe: Path, model_file: Path, fixtures: Path, tmp_path: Path) -> None:
    """The loader's MLServer client against a real MLServer: layout, load, v2 REST inference,
    index, unload; a wrong format and a corrupt file fail with MLServer's reason."""
    proc, url, models = await start_mlserver(mlserver_exe, tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            c = MLServerClient(url, s, models, pid=lambda: proc.pid)
            await c.wait_ready(120)
            size = await c.load("mnist__isvc-0123456789", {"path": str(model_file), "format": "sklearn"}, 60)
            assert size > 0, "the RSS delta of MLServer's process tree"
            assert json.loads((models / "mnist__isvc-0123456789" / "model-settings.json").read_text())["implementation"] == "mlserver_sklearn.SKLearnModel"
            async with s.post(f"{url}/v2/models/mnist__isvc-0123456789/infer", json=_v2_request(fixtures)) as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["outputs"][0]["data"] == [8]
            assert await c.held() == ["mnist__isvc-0123456789"]
            await c.unload("mnist__isvc-0123456789")
            assert await c.held() == [] and not (models / "mnist__isvc-0123456789").exists()

            with pytest.raises(RuntimeError, match="no built-in implementation for format 'pytorch'"):
                await c.load("torchy", {"path": str(model_file), "format": "pytorch"}, 60)
            corrupt = tmp_path / "corrupt.joblib"
            corrupt.write_bytes(b"not a joblib file")
            with pytest.raises(RuntimeError, match="MLServer could not load corrupt: HTTP"):
                await c.load("corrupt", {"path": str(corrupt), "format": "sklearn"}, 60)
            assert proc.alive(), "a bad model does not take MLServer down"
    finally:
        await proc.stop()
    assert tree_rss_bytes(proc.proc.pid) == 0 if proc.proc else True


def _mlserver_config(tmp: Path) -> Path:
    d = tmp / "mesh-config"
    d.mkdir()
    shutil.copy(REPO / "mesh-config" / "sklearn-mnist.yaml", d / "sklearn-mnist.yaml")
    shutil.copy(REPO / "mesh-config" / "examples" / "runtimes" / "mlserver.yaml", d / "mlserver.yaml")
    return d


async def test_a_pod_on_base_port_zero_runs_mlserver_on_reserved_ports(mlserver_exe: Path, model_file: Path, fixtures: Path,
                                                                        tmp_path: Path) -> None:
    """MESHSERVE_RUNTIME_BASE_PORT=0 (what tests run pods with): MLServer can't report the ports
    it binds, so the loader's own wiring (build_pod) starts it on reserved ports, outside the
    kernel's ephemeral range, and its renaming gRPC pass-through on a port the kernel picked. The
    pod advertises those, and a v2 request answers on each."""
    import grpc

    from meshserve.settings import Settings
    from meshserve_loader.pod import build_pod
    from meshserve_proto import grpc_predict_v2_pb2 as pb
    from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

    s = Settings(config_dir=_mlserver_config(tmp_path), data_dir=tmp_path / "data", pod_runtimes="mlserver-1.x", host="127.0.0.1",
                 loader_runs_runtime=True, runtime_base_port=0)
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    async with aiohttp.ClientSession() as session:
        built = await build_pod(s, 0, session)
        try:
            await built.server.wait_ready(120)
            rest, grpc_port = built.pod.rest_port, built.pod.grpc_port
            assert 0 < rest < lo and grpc_port not in (0, rest)
            await built.server.load("mnist__isvc-0000000042", {"path": str(model_file), "format": "sklearn"}, 60)
            async with session.post(f"http://127.0.0.1:{rest}/v2/models/mnist__isvc-0000000042/infer", json=_v2_request(fixtures)) as r:
                assert r.status == 200 and (await r.json())["outputs"][0]["data"] == [8]
            req = pb.ModelInferRequest(model_name="mnist")  # the alias, renamed by the pass-through
            inp = req.inputs.add(name="predict", datatype="FP32", shape=[1, 64])
            inp.contents.fp32_contents.extend(_v2_request(fixtures)["inputs"][0]["data"])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                out = await pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=[("mm-model-id", "mnist__isvc-0000000042")], timeout=60)
            assert out.model_name == "mnist__isvc-0000000042"
        finally:
            await built.server.stop()


def test_v2_rest_through_the_gateway_to_mlserver(mlserver_exe: Path, fixtures: Path, tmp_path: Path) -> None:
    """A mesh whose only pod runs MLServer: the users' v2 REST request through Envoy loads the
    model on MLServer (cold path, via the activator) and is answered by it, then again by the
    direct route."""
    with devmesh.mesh(config_dir=_mlserver_config(tmp_path), pods=1, pod_runtimes="mlserver-1.x") as m:
        for _ in range(2):
            out = subprocess.run(
                ["curl", "-sS", "-X", "POST", f"{m.rest}/v2/models/sklearn-mnist/infer", "-H", "Content-Type: application/json",
                 "-d", f"@{fixtures / 'mnist-request-v2-rest.json'}", "-w", "\n%{http_code}", "--max-time", "150"],
                capture_output=True, text=True, timeout=180,
            )
            body, _, code = out.stdout.rpartition("\n")
            assert code == "200", f"{out.stdout}\n{m.log()[-4000:]}"
            doc = json.loads(body)
            assert doc["model_name"].startswith("sklearn-mnist__isvc-") and doc["outputs"][0]["data"] == [8]
        assert "runtime=mlserver-1.x" in m.log()


def test_mlserver_streams_through_the_gateway(mlserver_exe: Path, fixtures: Path, tmp_path: Path) -> None:
    """MLServer's gRPC stream (ModelStreamInfer, MLServer 1.7's `predict_stream`) through the
    gateway, with MLServer's own client stub: cold (the activator holds the stream until the
    load, then passes it on), warm with `mm-vmodel-id` (Envoy to the pod), and with no header
    (Envoy reads the model from the first request). The loader's pass-through renames
    each request to the model's id, as it does a unary one. ModelMesh answers streams with
    "Streaming not yet supported" (kserve/modelmesh#133); before this, meshserve's pass-through
    forwarded unary calls only."""
    stream = REPO / "e2e" / "clientlib" / "mlserver_stream.py"
    request = fixtures / "mnist-request-v2-rest.json"
    with devmesh.mesh(config_dir=_mlserver_config(tmp_path), pods=1, pod_runtimes="mlserver-1.x") as m:
        for attempt, header in (("cold", "header"), ("warm", "header"), ("no header", "no-header")):
            out = subprocess.run([str(mlserver_exe.parent / "python"), str(stream), m.grpc, "sklearn-mnist", str(request), header],
                                 capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stderr[-3000:]
            got = json.loads(out.stdout.strip().splitlines()[-1])
            assert "ok" in got, f"{attempt}: {got}\n{m.log()[-4000:]}"
            (answer,) = got["ok"]
            assert answer["modelName"].startswith("sklearn-mnist__isvc-") and answer["id"] == "s1", (attempt, answer)
            assert answer["outputs"][0]["contents"]["int64Contents"] == ["8"], (attempt, answer)


def test_each_model_goes_to_its_runtime_pool(mlserver_exe: Path, fixtures: Path, tmp_path: Path) -> None:
    """Issues 5 and 7: one built-in pod and one MLServer pod, both auto-selecting sklearn. The
    seed's sklearn-mnist names no runtime, so KServe's rule (the first runtime by name that
    auto-selects sklearn: meshserve-builtin) puts it on the built-in pod, and the seed's
    proto-JSON curl works (MLServer would answer it 422). A copy of it that names
    `runtime: mlserver-1.x` is served by MLServer, through the same gateway."""
    cfg = _mlserver_config(tmp_path)
    named = (cfg / "sklearn-mnist.yaml").read_text().replace("name: sklearn-mnist", "name: mnist-on-mlserver").replace(
        "      modelFormat:", "      runtime: mlserver-1.x\n      modelFormat:")
    (cfg / "mnist-on-mlserver.yaml").write_text(named)

    def post(model: str, body: str, *headers: str) -> tuple[str, dict]:
        out = subprocess.run(["curl", "-sS", "-X", "POST", f"{m.rest}/v2/models/{model}/infer", "-d", f"@{fixtures / body}", *headers,
                              "-w", "\n%{http_code}", "--max-time", "150"], capture_output=True, text=True, timeout=180)
        text, _, code = out.stdout.rpartition("\n")
        return code, json.loads(text) if text.startswith("{") else {"raw": text}

    import redis

    with devmesh.mesh(config_dir=cfg, pods=2, pod_runtimes="builtin,mlserver-1.x") as m:
        r = redis.Redis.from_url(m.redis_url)  # `meshserve up` says it is up once both pods are registered
        code, doc = post("sklearn-mnist", "mnist-request-proto-json.json")
        assert code == "200", f"{doc}\n{m.log()[-4000:]}"
        assert doc["outputs"][0]["contents"]["int64Contents"] == ["8"] and "modelName" in doc  # the built-in runtime's answer
        code, doc = post("mnist-on-mlserver", "mnist-request-v2-rest.json", "-H", "Content-Type: application/json")
        assert code == "200", f"{doc}\n{m.log()[-4000:]}"
        assert doc["model_name"].startswith("mnist-on-mlserver__isvc-") and doc["outputs"][0]["data"] == [8]  # MLServer's
        try:
            pods = {json.loads(v)["runtime"]: k.decode() for k, v in r.hgetall("ms:pods").items()}
            where = {a.decode(): set(json.loads(r.hget("ms:placements", r.hget("ms:aliases", a)) or b"{}"))
                     for a in (b"sklearn-mnist", b"mnist-on-mlserver")}
        finally:
            r.close()
        assert where == {"sklearn-mnist": {pods["meshserve-builtin"]}, "mnist-on-mlserver": {pods["mlserver-1.x"]}}
