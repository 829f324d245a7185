# Over 400 lines: one check per manifest family, all over the same loaded schemas; split, each file would load them again.
"""Every manifest in istio/ (and the InferenceService/ServingRuntime examples) validates offline:
core kinds with kubernetes-validate (strict: unknown fields fail), Istio kinds against Istio's
CRD schemas and KServe kinds against KServe's, both from ../shared/schemas, made strict the
same way. Plus the cross-references a schema can't see. Kind: unit (files only, no cluster)."""

from __future__ import annotations

import copy
import glob
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from meshserve.k8s import objects as ob

REPO = Path(__file__).resolve().parent.parent
ISTIO = REPO / "istio"
SHARED = REPO.parent / "shared"
SCHEMAS = SHARED / "schemas"
K8S_VERSION = "1.30"  # the oldest Kubernetes we claim: autoscaling/v2, policy/v1
needs_shared = pytest.mark.skipif(not SCHEMAS.exists(), reason="needs ../shared/schemas (Istio and KServe CRD schemas) beside the repository")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CORE_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1"}


def manifest_files() -> list[Path]:
    return sorted(p for p in ISTIO.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for p in paths:
        for i, d in enumerate(yaml.safe_load_all(p.read_text())):
            if d is not None:
                yield f"{p.relative_to(REPO.parent)}#{i} {d.get('kind')}/{(d.get('metadata') or {}).get('name')}", d


ALL = list(docs(manifest_files()))


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in ALL if d.get("kind") == kind]


# --- schemas ---------------------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as `kubectl apply --validate=strict` would:
    objects with `properties` and no other allowance get additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
            out["properties"].setdefault("apiVersion", {"type": "string"})
            out["properties"].setdefault("kind", {"type": "string"})
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_schemas(*files: str) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from CRD manifests."""
    out: dict[tuple[str, str], Any] = {}
    for f in files:
        for crd in yaml.load_all((SCHEMAS / f).read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                schema = v["schema"]["openAPIV3Schema"]
                # metadata is checked by the API server, not the CRD schema.
                schema = {**schema, "properties": {k: s for k, s in schema.get("properties", {}).items() if k != "metadata"}}
                out[(f"{group}/{v['name']}", kind)] = strict(schema)
    return out


def istio_schemas() -> dict[tuple[str, str], Any]:
    return crd_schemas("istio-crd-all.gen.yaml")


def kserve_schemas() -> dict[tuple[str, str], Any]:
    return crd_schemas("kserve-inferenceservices-crd.yaml", "kserve-servingruntimes-crd.yaml")


_validators: dict[int, jsonschema.Draft7Validator] = {}


def check_crd(d: dict[str, Any], schemas: dict[tuple[str, str], Any]) -> None:
    key = (d["apiVersion"], d["kind"])
    assert key in schemas, f"no CRD schema for {key}"
    body = {k: v for k, v in d.items() if k != "metadata"}
    # One validator per schema: checking the 2 MB InferenceService schema itself takes seconds.
    schema = schemas[key]
    v = _validators.get(id(schema))
    if v is None:
        v = _validators[id(schema)] = jsonschema.Draft7Validator(schema)
    v.validate(body)


# --- schema validation -----------------------------------------------------------------------

@pytest.mark.parametrize("where,doc", [(w, d) for w, d in ALL if d["apiVersion"] in CORE_GROUPS], ids=lambda x: x if isinstance(x, str) else "")
def test_core_kinds_validate(where: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_core_validation_has_teeth() -> None:
    dep = copy.deepcopy(by_kind("Deployment")[0])
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


@needs_shared
@pytest.mark.parametrize("where,doc", [(w, d) for w, d in ALL if "istio.io" in d["apiVersion"]], ids=lambda x: x if isinstance(x, str) else "")
def test_istio_kinds_validate(where: str, doc: dict[str, Any]) -> None:
    check_crd(doc, istio_schemas())


@needs_shared
def test_istio_validation_has_teeth() -> None:
    pa = copy.deepcopy(by_kind("PeerAuthentication")[0])
    pa["spec"]["mtls"]["mode"] = "STRICTLY"
    with pytest.raises(jsonschema.ValidationError):
        check_crd(pa, istio_schemas())
    vs = copy.deepcopy(by_kind("VirtualService")[0])
    vs["spec"]["http"][0]["rout"] = vs["spec"]["http"][0].pop("route")
    with pytest.raises(jsonschema.ValidationError):
        check_crd(vs, istio_schemas())


def kserve_examples() -> list[tuple[str, dict[str, Any]]]:
    paths = manifest_files() + sorted((REPO / "mesh-config").glob("*.yaml")) + sorted((SHARED / "fixtures").glob("*.yaml"))
    return [(w, d) for w, d in docs(paths) if d.get("apiVersion", "").startswith("serving.kserve.io/")]


@needs_shared
@pytest.mark.parametrize("where,doc", kserve_examples(), ids=lambda x: x if isinstance(x, str) else "")
def test_kserve_examples_validate(where: str, doc: dict[str, Any]) -> None:
    check_crd(doc, kserve_schemas())


@needs_shared
def test_kserve_validation_has_teeth() -> None:
    (_, isvc), *_ = [x for x in kserve_examples() if x[1]["kind"] == "InferenceService"]
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["storge"] = bad["spec"]["predictor"]["model"].pop("storage")
    with pytest.raises(jsonschema.ValidationError):
        check_crd(bad, kserve_schemas())


@needs_shared
def test_kserve_examples_include_ours() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for _, d in kserve_examples()}
    assert {("ServingRuntime", "meshserve-builtin"), ("ServingRuntime", "mlserver-1.x"), ("InferenceService", "sklearn-mnist")} <= names


def gateway_api_schemas() -> dict[tuple[str, str], Any]:
    return crd_schemas("gateway-api-standard-crds.yaml")


GATEWAY_API = list(docs([ISTIO / "alternatives" / "gateway-api.yaml"]))


@needs_shared
@pytest.mark.parametrize("where,doc", GATEWAY_API, ids=[w for w, _ in GATEWAY_API])
def test_gateway_api_kinds_validate(where: str, doc: dict[str, Any]) -> None:
    check_crd(doc, gateway_api_schemas())


@needs_shared
def test_gateway_api_validation_has_teeth() -> None:
    route = copy.deepcopy(next(d for _, d in GATEWAY_API if d["kind"] == "HTTPRoute"))
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Glob"
    with pytest.raises(jsonschema.ValidationError):
        check_crd(route, gateway_api_schemas())


def test_gateway_api_routes_reach_the_meshserve_gateway() -> None:
    """The routes attach to the Gateway's listeners and send to the Service ports istio.yaml uses."""
    gw = next(d for _, d in GATEWAY_API if d["kind"] == "Gateway")
    listeners = {lst["name"]: lst["port"] for lst in gw["spec"]["listeners"]}
    svc = next(d for d in by_kind("Service") if d["metadata"]["name"] == "meshserve-gateway")
    ports = {p["port"] for p in svc["spec"]["ports"]}
    for _, d in GATEWAY_API:
        if d["kind"] not in ("HTTPRoute", "GRPCRoute"):
            continue
        for ref in d["spec"]["parentRefs"]:
            assert ref["name"] == gw["metadata"]["name"] and ref["sectionName"] in listeners
        for rule in d["spec"]["rules"]:
            for b in rule["backendRefs"]:
                assert b["name"] == "meshserve-gateway" and b["port"] in ports
                assert b["port"] == listeners[d["spec"]["parentRefs"][0]["sectionName"]]


def test_every_kind_is_covered() -> None:
    """No manifest slips past validation because nothing knows its kind."""
    known = CORE_GROUPS | {"networking.istio.io/v1beta1", "networking.istio.io/v1alpha3", "security.istio.io/v1beta1",
                           "serving.kserve.io/v1beta1", "serving.kserve.io/v1alpha1", "monitoring.coreos.com/v1",
                           "gateway.networking.k8s.io/v1"}
    assert {d["apiVersion"] for _, d in ALL} <= known


def test_pod_monitors_have_the_required_shape() -> None:
    # The Prometheus Operator CRDs are not in ../shared/schemas: check what they require.
    for pm in by_kind("PodMonitor"):
        assert pm["spec"]["selector"]["matchLabels"]
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert ("port" in ep) != ("targetPort" in ep) and ep["path"].startswith("/")


# --- what schemas can't see --------------------------------------------------------------------

def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]) for d in by_kind("Deployment") + by_kind("StatefulSet")]


def test_kustomization_lists_every_manifest_and_they_exist() -> None:
    k = yaml.safe_load((ISTIO / "kustomization.yaml").read_text())
    listed = set(k["resources"])
    on_disk = {p.name for p in ISTIO.glob("*.yaml") if p.name != "kustomization.yaml"}
    on_disk |= {f"crds/{p.name}" for p in (ISTIO / "crds").glob("*.yaml")}
    assert listed == on_disk
    ex = yaml.safe_load((ISTIO / "examples" / "kustomization.yaml").read_text())
    assert all((ISTIO / "examples" / r).exists() for r in ex["resources"])


def test_dashboards_generator_lists_every_dashboard() -> None:
    k = yaml.safe_load((ISTIO / "dashboards" / "kustomization.yaml").read_text())
    files = {str((ISTIO / "dashboards" / f).resolve()) for g in k["configMapGenerator"] for f in g["files"]}
    found = {str(Path(p).resolve()) for p in glob.glob(str(REPO / "grafana" / "dashboards" / "*.json"))}
    assert files == found, "list every grafana/dashboards/*.json in istio/dashboards/kustomization.yaml"
    for f in files:
        json.loads(Path(f).read_text())


def test_references_resolve() -> None:
    """Service accounts, secrets, selectors and named ports all point at something that exists."""
    accounts = {d["metadata"]["name"] for d in by_kind("ServiceAccount")}
    secrets = {d["metadata"]["name"] for d in by_kind("Secret")} | {ob.STORAGE_SECRET}
    templates = pod_templates()
    for name, t in templates:
        spec = t["spec"]
        assert spec["serviceAccountName"] in accounts, name
        ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, (name, ref)
            for probe in ("readinessProbe", "livenessProbe"):
                p = c.get(probe) or {}
                port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if isinstance(port, str):
                    assert port in ports, (name, c["name"], port)
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        example_claims = {d["metadata"]["name"] for _, d in docs(sorted((ISTIO / "examples").glob("*.yaml"))) if d["kind"] == "PersistentVolumeClaim"}
        assert claims <= example_claims, name
    for svc in by_kind("Service"):
        sel = svc["spec"]["selector"]
        matching = [t for _, t in templates if sel.items() <= t["metadata"]["labels"].items()]
        assert matching, f"Service {svc['metadata']['name']} selects no pods"
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str):
                assert any(p["targetPort"] in {cp["name"] for c in t["spec"]["containers"] for cp in c.get("ports", [])} for t in matching), p
    for hpa in by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["name"] in {d["metadata"]["name"] for d in by_kind(ref["kind"])}


def test_controller_sees_runtime_pods_and_may_do_what_it_does() -> None:
    """The controller's pod selector matches the runtime template, and its Role grants exactly
    the reads and status writes controller/meshserve_controller/controller.py makes, nothing more."""
    sel = dict(kv.split("=") for kv in ob.RUNTIME_POD_SELECTOR.split(","))
    runtime_templates = [t for _, t in pod_templates() if t["metadata"]["labels"].get("app.kubernetes.io/component") == "runtime"]
    assert runtime_templates and all(sel.items() <= t["metadata"]["labels"].items() for t in runtime_templates)
    (role,) = by_kind("Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for res in ("inferenceservices", "servingruntimes"):
        assert {("serving.kserve.io", res, v) for v in ("list", "watch")} <= grants
    assert ("serving.kserve.io", "inferenceservices/status", "patch") in grants
    # TrafficRules: watched, and only their status written.
    assert {("meshserve.io", "trafficrules", v) for v in ("list", "watch")} | {("meshserve.io", "trafficrules/status", "patch")} <= grants
    assert not any(g == "meshserve.io" and r == "trafficrules" and v in ("patch", "update") for g, r, v in grants)
    assert {("", "pods", "list"), ("", "pods", "watch"), ("", "secrets", "watch")} <= grants
    # Scale to zero: pools are watched, and only their scale subresource is written.
    assert {("apps", "statefulsets", "list"), ("apps", "statefulsets", "watch"), ("apps", "statefulsets/scale", "patch")} <= grants
    assert not any(g == "apps" and r == "statefulsets" and v in ("patch", "update") for g, r, v in grants)
    # Every runtime pool's StatefulSet says which ServingRuntime it runs, so it can be scaled.
    pools = [d for d in by_kind("StatefulSet") if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "runtime"]
    assert pools and all(ob.parse_pool(d) is not None for d in pools)
    assert {ob.parse_pool(d).runtime for d in pools} == {d["metadata"]["name"] for d in by_kind("ServingRuntime")}
    assert not any(v in ("create", "delete", "deletecollection", "*") for _, _, v in grants)
    secret_rule = next(r for r in role["rules"] if "secrets" in r["resources"])
    assert secret_rule["resourceNames"] == [ob.STORAGE_SECRET]
    # Everyone else has no API token at all.
    for name, t in pod_templates():
        if name != "meshserve-controller":
            assert t["spec"].get("automountServiceAccountToken") is False, name


def test_gateway_ports_match_the_users_contract() -> None:
    from meshserve.settings import GATEWAY_GRPC_PORT, GATEWAY_REST_PORT

    (gw,) = [g for g in by_kind("Gateway") if g["apiVersion"].startswith("networking.istio.io/")]
    assert {s["port"]["number"] for s in gw["spec"]["servers"]} == {GATEWAY_REST_PORT, GATEWAY_GRPC_PORT}
    (gapi,) = [g for g in by_kind("Gateway") if g["apiVersion"].startswith("gateway.networking.k8s.io/")]
    assert {lst["port"] for lst in gapi["spec"]["listeners"]} == {GATEWAY_REST_PORT, GATEWAY_GRPC_PORT}
    svc = next(s for s in by_kind("Service") if s["metadata"]["name"] == "modelmesh-serving")
    assert {p["port"] for p in svc["spec"]["ports"]} == {GATEWAY_REST_PORT, GATEWAY_GRPC_PORT}
    deps = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    assert deps["meshserve-gateway"]["spec"]["replicas"] >= 2


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds() -> None:
    for args in (["kubectl", "kustomize", str(ISTIO)], ["kubectl", "kustomize", str(ISTIO / "examples")],
                 ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(ISTIO / "dashboards")]):
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert rendered
        for d in rendered:
            assert d["metadata"].get("namespace") in ("modelmesh-serving", None)
            if d["apiVersion"] in CORE_GROUPS:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_tiltfile_parses_and_names_real_paths() -> None:
    """No tilt binary here: check the Starlark parses (it is a Python subset) and that every
    repository path it builds, syncs or applies exists."""
    import ast

    text = (REPO / "Tiltfile").read_text()
    tree = ast.parse(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    paths = set()
    for c in calls:
        if c.func.id in ("sync", "kustomize") and isinstance(c.args[0], ast.Constant):
            paths.add(c.args[0].value)
        for kw in c.keywords:
            if kw.arg == "dockerfile" and isinstance(kw.value, ast.Constant):
                paths.add(kw.value.value)
    assert {"istio", "istio/examples", "istio/dashboards", "docker/Dockerfile", "meshserve"} <= paths
    for p in paths:
        assert (REPO / p).exists(), p
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for target in ("control-plane", "loader", "runtime", "dev"):
        assert f" AS {target}\n" in dockerfile, target


def test_dockerfile_copies_what_exists_and_images_match_manifests() -> None:
    """No Docker engine here to build with: check what can be checked without one."""
    import re

    text = (REPO / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.M):
        assert (REPO / src).exists(), f"docker/Dockerfile copies {src}, which does not exist"
    assert (REPO / "docker" / "runtime-entrypoint.sh").stat().st_mode & 0o111
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M))
    images = {c["image"] for _, t in pod_templates() for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]}
    ours = {i.split("/", 1)[1] for i in images if i.startswith("meshserve/")}
    assert ours <= targets, "every meshserve/<x> image is a docker/Dockerfile target"
    # Each container's command exists in its image: runnable modules and scripts we ship.
    import importlib.util

    for _, t in pod_templates():
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]:
            cmd = list(c.get("command") or [])
            if cmd and cmd[0].startswith("/app/"):
                assert (REPO / cmd[0].removeprefix("/app/")).exists(), cmd[0]
                cmd = cmd[1:]
            if cmd[:2] == ["python", "-m"]:
                mod = cmd[2]
                spec = importlib.util.find_spec(mod)
                assert spec is not None, mod
                if spec.submodule_search_locations:  # a package runs its __main__
                    assert importlib.util.find_spec(mod + ".__main__") is not None, mod


# --- cluster mode: pod identity, health and metrics (issue 7) ------------------------------------

def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom dict."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def container(template: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in template["spec"].get("initContainers", []) + template["spec"]["containers"] if c["name"] == name]
    return c


def named_ports(template: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p}


POD_NAME = {"fieldRef": {"fieldPath": "metadata.name"}}
POD_IP = {"fieldRef": {"fieldPath": "status.podIP"}}


def test_runtime_pods_take_their_id_from_the_pod_name_and_serve_on_fixed_ports() -> None:
    """Every container of a runtime pool that runs meshserve code is in cluster mode: its id is
    the pod's name (downward API) and its ports the fixed MESHSERVE_POD_PORT ones, which match
    the declared container ports. No index shim or per-pool offset is left."""
    from meshserve.settings import Settings

    pools = {n: t for n, t in pod_templates() if t["metadata"]["labels"].get("app.kubernetes.io/component") == "runtime"}
    assert {"meshserve-runtime-builtin", "meshserve-runtime-mlserver"} <= set(pools)
    for name, t in pools.items():
        ports = named_ports(t)
        for c in t["spec"]["containers"]:
            env = env_of(c)
            assert "MESHSERVE_INDEX_OFFSET" not in env and "runtime-entrypoint.sh" not in " ".join(c.get("command") or []), (name, c["name"])
            if not c["image"].startswith("meshserve/"):
                continue
            assert env.get("MESHSERVE_POD_ID") == POD_NAME, (name, c["name"])
            s = Settings(pod_id="x", pod_port=int(env["MESHSERVE_POD_PORT"]))
            rest, grpc_port, metrics = s.pod_ports(0)
            assert ports["rest"] == rest and ports["grpc"] == grpc_port and ports["metrics"] == metrics, (name, ports)


def test_the_mlserver_pool_meets_its_loader() -> None:
    """The MLServer pool: the loader's copy of the ServingRuntime (a ConfigMap) is the applied
    one, the loader finds it where MESHSERVE_CONFIG_DIR points (as a ConfigMap volume lays files
    out), and MLServer's ports and models dir are the ones the loader will use."""
    import os
    import tempfile

    from meshserve.settings import Settings
    from meshserve_loader.pod import find_runtime, mlserver_models_dir, runtime_name_of_pod

    (t,) = [t for n, t in pod_templates() if n == "meshserve-runtime-mlserver"]
    loader, mlserver = container(t, "loader"), container(t, "mlserver")
    lenv, menv = env_of(loader), env_of(mlserver)
    (cm,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "meshserve-runtime-mlserver"]
    (sr,) = [d for d in by_kind("ServingRuntime") if d["metadata"]["name"] == lenv["MESHSERVE_POD_RUNTIMES"]]
    (text,) = cm["data"].values()
    assert yaml.safe_load(text) == sr, "the ConfigMap's ServingRuntime differs from the applied one"
    assert mlserver["image"] == sr["spec"]["containers"][0]["image"]
    vols = {v["name"]: v for v in t["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in loader["volumeMounts"]}
    assert vols[mounts[lenv["MESHSERVE_CONFIG_DIR"]]]["configMap"]["name"] == cm["metadata"]["name"]
    with tempfile.TemporaryDirectory() as d:
        # A ConfigMap volume: files are links into a timestamped dir through ..data.
        real = Path(d) / "..2024_01_01_00_00_00.1"
        real.mkdir()
        for k, v in cm["data"].items():
            (real / k).write_text(v)
        os.symlink(real.name, Path(d) / "..data")
        for k in cm["data"]:
            os.symlink(f"..data/{k}", Path(d) / k)
        s = Settings(pod_id="meshserve-runtime-mlserver-0", pod_port=int(lenv["MESHSERVE_POD_PORT"]), config_dir=Path(d),
                     data_dir=Path(lenv["MESHSERVE_DATA_DIR"]), pod_runtimes=lenv["MESHSERVE_POD_RUNTIMES"])
        spec = find_runtime(s.config_dir, runtime_name_of_pod(s, 0))
    assert spec.server_type == "mlserver" and not s.loader_runs_runtime and "MESHSERVE_LOADER_RUNS_RUNTIME" not in lenv
    rest, grpc_port, loader_metrics = s.pod_ports(0)
    # MLServer's REST is the pod's; its gRPC is the ServingRuntime's grpcDataEndpoint, behind the
    # loader's renaming pass-through on the pod's gRPC port, which the loader container declares.
    assert int(menv["MLSERVER_HTTP_PORT"]) == rest
    assert int(menv["MLSERVER_GRPC_PORT"]) == spec.grpc_data_port not in (rest, grpc_port, loader_metrics, rest + 3)
    assert {p["name"]: p["containerPort"] for p in loader["ports"]}["grpc"] == grpc_port
    assert {p["name"]: p["containerPort"] for p in mlserver["ports"]}["mlserver-grpc"] == spec.grpc_data_port
    assert int(menv["MLSERVER_METRICS_PORT"]) == rest + 3 != loader_metrics
    assert Path(menv["MLSERVER_MODELS_DIR"]) == mlserver_models_dir(s, s.pod_id)
    assert menv["MLSERVER_LOAD_MODELS_AT_STARTUP"] == "false"
    # Both containers see the pulled models and the model folders at the same paths.
    mm = {m["mountPath"]: m["name"] for m in mlserver["volumeMounts"]}
    for path in (lenv["MESHSERVE_DATA_DIR"], "/data/pvc/my-models-pvc"):
        assert mm[path] == mounts[path]


def test_xds_readiness_is_its_health_endpoint_on_the_pod_ip() -> None:
    (t,) = [t for n, t in pod_templates() if n == "meshserve-gateway"]
    xds = container(t, "xds")
    env = env_of(xds)
    probe = xds["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in xds["ports"]}
    assert ports[probe["port"]] == int(env["MESHSERVE_XDS_DEBUG_PORT"])
    assert env["MESHSERVE_XDS_DEBUG_HOST"] == POD_IP


def test_the_gateway_bootstrap_command_adds_only_a_prometheus_listener_on_the_pod_ip(tmp_path: Path) -> None:
    """Run the init container's command as the pod would (its env, the pod IP filled in)."""
    import os
    import sys

    (t,) = [t for n, t in pod_templates() if n == "meshserve-gateway"]
    init = container(t, "bootstrap")
    env = {k: ("10.1.2.3" if v == POD_IP else "meshserve-gateway-abc" if v == POD_NAME else v) for k, v in env_of(init).items()}
    cmd = [a.replace("$(POD_NAME)", env["POD_NAME"]).replace("/bootstrap/", f"{tmp_path}/") for a in init["command"]]
    assert cmd[:2] == ["python", "-m"]
    out = subprocess.run([sys.executable, *cmd[1:]], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    boot = json.loads((tmp_path / "envoy.json").read_text())
    assert boot["node"]["id"] == "meshserve-gateway-abc"
    assert boot["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"
    (listener,) = boot["staticResources"]["listeners"]
    addr = listener["address"]["socketAddress"]
    assert addr == {"address": "10.1.2.3", "portValue": named_ports(t)["envoy-metrics"]}
    routes = listener["filterChains"][0]["filters"][0]["typedConfig"]["routeConfig"]["virtualHosts"][0]["routes"]
    forwarded = [r for r in routes if "route" in r]
    assert [r["match"]["path"] for r in forwarded] == ["/stats/prometheus"]
    assert all("directResponse" in r for r in routes if "route" not in r)


def test_every_scraped_port_exists_and_is_permissive() -> None:
    """Each PodMonitor port names a container port of some pod it selects (or is the Istio
    sidecar's), and under STRICT mTLS every plain port Prometheus scrapes is PERMISSIVE for
    those pods."""
    istio_ports = {"http-envoy-prom": 15090}
    pas = by_kind("PeerAuthentication")
    for pm in by_kind("PodMonitor"):
        sel = pm["spec"]["selector"]["matchLabels"]
        selected = [t for _, t in pod_templates() if sel.items() <= t["metadata"]["labels"].items()]
        assert selected, pm["metadata"]["name"]
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if "targetPort" in ep or ep["port"] in istio_ports:
                continue  # the sidecar's own, merged or mTLS-exempt by Istio
            having = [t for t in selected if ep["port"] in named_ports(t)]
            assert having, (pm["metadata"]["name"], ep["port"])
            for tmpl in having:
                number = str(named_ports(tmpl)[ep["port"]])
                labels = tmpl["metadata"]["labels"]
                assert any(pa["spec"].get("selector", {}).get("matchLabels", {}).items() <= labels.items()
                           and (pa["spec"].get("portLevelMtls") or {}).get(number, {}).get("mode") == "PERMISSIVE" for pa in pas), \
                    (pm["metadata"]["name"], ep["port"], number)
