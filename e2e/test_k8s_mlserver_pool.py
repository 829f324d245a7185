"""The MLServer runtime pool (istio/runtime-mlserver.yaml) short of a cluster: its two containers
as processes, with the environment the manifest gives them. MLServer from its venv (the image's
`mlserver start $MLSERVER_MODELS_DIR`), the loader as `python -m meshserve_loader` in cluster mode
reading the ServingRuntime from a ConfigMap-shaped directory, a real Valkey. Placement's orders
are written by hand: the loader registers under the pod's name on the fixed ports, loads a model
into the MLServer beside it, which answers inference on the pod's REST port, and unloads it.

Paths and ports are the manifest's, moved: /data, /tmp and /etc/meshserve/runtimes under a temp
dir, port 8080 and its neighbours to a free block (the same offsets), and MLServer bound to
127.0.0.1 (the manifest leaves MLServer's default, all addresses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import yaml

from meshserve_testing import devmesh
from meshserve.store import keys
from meshserve.model import ModelSpec, Pod
from meshserve_loader.example_models import write_sklearn
from meshserve_loader.servers.mlserver_venv import ensure_mlserver

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
POD = "meshserve-runtime-mlserver-0"


def manifest() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((REPO / "istio" / "runtime-mlserver.yaml").read_text()) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return sts["spec"]["template"], cm


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


@pytest.fixture(scope="module")
def mlserver_exe() -> Path:
    return ensure_mlserver(REPO)


@pytest.fixture(scope="module")
def valkey() -> Iterator[devmesh.Valkey]:
    with devmesh.valkey() as v:
        yield v


def test_the_mlserver_pool_pod_loads_and_serves(mlserver_exe: Path, valkey: devmesh.Valkey, fixtures: Path) -> None:
    template, cm = manifest()
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    menv, lenv = plain_env(containers["mlserver"]), plain_env(containers["loader"])
    pod_port = int(lenv["MESHSERVE_POD_PORT"])
    data_port = int(menv["MLSERVER_GRPC_PORT"])
    assert f"grpcDataEndpoint: port:{data_port}" in next(iter(cm["data"].values()))
    base = devmesh.free_block(10)

    with tempfile.TemporaryDirectory(prefix="ms-mlpool-") as tmp:
        root = Path(tmp)

        def moved(v: str) -> str:
            for prefix in ("/etc/meshserve/runtimes", "/data", "/tmp"):
                if v == prefix or v.startswith(prefix + "/"):
                    return str(root / prefix.strip("/")) + v[len(prefix):]
            return v

        def port(v: str) -> str:
            return str(base + int(v) - pod_port)

        # The ConfigMap volume, laid out as the kubelet does (..data -> a timestamped dir).
        cfg = root / "etc" / "meshserve" / "runtimes"
        real = cfg / "..2025_01_01_00_00_00.1"
        real.mkdir(parents=True)
        for k, v in cm["data"].items():
            # MLServer's gRPC (the ServingRuntime's grpcDataEndpoint) moves with the other ports.
            (real / k).write_text(v.replace(f"port:{data_port}", f"port:{port(str(data_port))}"))
            os.symlink(f"..data/{k}", cfg / k)
        os.symlink(real.name, cfg / "..data")
        (root / "tmp").mkdir()
        write_sklearn(root / "data" / "pvc" / "my-models-pvc" / "mnist-svm.joblib")

        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "MLSERVER_"))}
        ml_env = {**clean, **{k: (port(v) if k.endswith("_PORT") else moved(v)) for k, v in menv.items()}, "MLSERVER_HOST": "127.0.0.1"}
        ld_env = {**clean, **{k: (port(v) if k == "MESHSERVE_POD_PORT" else moved(v)) for k, v in lenv.items()}}
        ld_env.update({"MESHSERVE_POD_ID": POD, "MESHSERVE_HOST": "127.0.0.1", "MESHSERVE_REDIS_URL": valkey.url, "MESHSERVE_LOG_JSON": "false",
                       "MESHSERVE_STORAGE_CONFIG": "", "MESHSERVE_HEARTBEAT_SECONDS": "0.2", "MESHSERVE_DRAIN_TIMEOUT_SECONDS": "1"})
        r = redis.Redis.from_url(valkey.url)
        r.flushdb()
        logs = {"mlserver": root / "mlserver.log", "loader": root / "loader.log"}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(subprocess.Popen([str(mlserver_exe), "start", ml_env["MLSERVER_MODELS_DIR"]], env=ml_env, cwd=root / "tmp",
                                          stdout=open(logs["mlserver"], "wb"), stderr=subprocess.STDOUT, start_new_session=True))
            procs.append(subprocess.Popen([sys.executable if a == "python" else a for a in containers["loader"]["command"]], env=ld_env,
                                          stdout=open(logs["loader"], "wb"), stderr=subprocess.STDOUT))
            raw = devmesh.wait_until(lambda: r.hget(keys.PODS, POD), 180, "the pool's pod registered (MLServer up, loader found its runtime)")
            pod = Pod.from_json(raw)
            assert (pod.id, pod.rest_port, pod.grpc_port, pod.runtime, pod.formats) == (POD, base, base + 1, "mlserver-1.x", ["sklearn"])
            status, body = devmesh.http_get(f"http://127.0.0.1:{base + 2}/metrics")  # the loader's, on the third port
            assert status == 200 and b"meshserve_loader_capacity_bytes" in body

            spec = ModelSpec(id="sklearn-mnist__isvc-0000000001", alias="sklearn-mnist", format="sklearn",
                             storage={"parameters": {"type": "pvc", "name": "my-models-pvc"}, "path": "mnist-svm.joblib"})
            r.xadd(keys.orders_key(POD), {"op": "load", "model": spec.id, "spec": spec.to_json()})
            ev = _event(r, spec.id, "load")
            assert ev["ok"] == "1", ev
            assert int(ev["size"]) > 0  # the predicted size: MLServer's process is another container's
            folder = root / "data" / "mlserver" / spec.id
            assert json.loads((folder / "model-settings.json").read_text())["implementation"] == "mlserver_sklearn.SKLearnModel"
            req = (fixtures / "mnist-request-v2-rest.json").read_bytes()
            out = subprocess.run(["curl", "-sS", "-X", "POST", f"http://127.0.0.1:{base}/v2/models/{spec.id}/infer",
                                  "-H", "Content-Type: application/json", "--data-binary", "@-", "--max-time", "30"],
                                 input=req, capture_output=True, timeout=60)
            assert json.loads(out.stdout)["outputs"][0]["data"] == [8], out.stdout
            # gRPC as a ModelMesh client sends it through the gateway: the InferenceService's
            # name in the message, the model id in `mm-model-id` (the route adds it). The pod's
            # gRPC port is the loader's pass-through, which puts the id in the message for
            # MLServer; without it MLServer answers NOT_FOUND for the name.
            assert _grpc_infer(base + 1, "sklearn-mnist", spec.id, fixtures).model_name == spec.id
            import grpc

            with pytest.raises(grpc.RpcError) as miss:
                _grpc_infer(int(port(str(data_port))), "sklearn-mnist", spec.id, fixtures)
            assert miss.value.code() == grpc.StatusCode.NOT_FOUND
            # Why the pool ships at 0 replicas: the seed's proto3-JSON body (`contents`) is refused.
            proto = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                                    f"http://127.0.0.1:{base}/v2/models/{spec.id}/infer", "-H", "Content-Type: application/json",
                                    "--data-binary", f"@{fixtures / 'mnist-request-proto-json.json'}", "--max-time", "30"],
                                   capture_output=True, text=True, timeout=60)
            assert proto.stdout == "422", proto.stdout

            r.xadd(keys.orders_key(POD), {"op": "unload", "model": spec.id})
            assert _event(r, spec.id, "unload")["ok"] == "1"
            assert not folder.exists()
        except BaseException:
            for name, p in logs.items():
                print(f"--- {name}\n{p.read_text(errors='replace')[-3000:] if p.exists() else ''}")
            raise
        finally:
            for p in reversed(procs):
                devmesh.stop(p, 20)
            r.close()


def _grpc_infer(port: int, name: str, model_id: str, fixtures: Path) -> Any:
    import grpc

    from meshserve_proto import grpc_predict_v2_pb2 as pb
    from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

    doc = json.loads((fixtures / "mnist-request-v2-rest.json").read_text())["inputs"][0]
    req = pb.ModelInferRequest(model_name=name)
    inp = req.inputs.add(name=doc["name"], datatype="FP32", shape=doc["shape"])
    inp.contents.fp32_contents.extend(doc["data"])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=[("mm-model-id", model_id)], timeout=60)


def _event(r: redis.Redis, model: str, op: str, timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, f in r.xrange(keys.EVENTS):
            e = {k.decode(): v.decode() for k, v in f.items()}
            if e.get("model") == model and e.get("op") == op and e.get("pod") == POD:
                return e
        time.sleep(0.1)
    raise TimeoutError(f"no {op} event for {model}")
