"""Watchers and controller with the real `kubernetes` client over HTTP against a fake API server
(meshserve_testing.fakeapi) speaking list/watch, and a real Valkey. Kind: integration (local
processes and sockets on 127.0.0.1 only, every server stopped; each test bounded to seconds)."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import yaml
from kubernetes import client

from meshserve.store import State, keys
from meshserve.store.messages import KIND_POD
from meshserve.apply import read_models
from meshserve_controller.controller import Controller
from meshserve_testing.fakeapi import FakeApiServer
from meshserve_testing.k8s import running_controller, until
from meshserve.model import Pod

REPO = Path(__file__).resolve().parent.parent
NS = "modelmesh-serving"

MNIST = yaml.safe_load((REPO / "mesh-config" / "sklearn-mnist.yaml").read_text())
BUILTIN_RUNTIME = {
    "metadata": {"name": "meshserve-builtin"},
    "spec": {"supportedModelFormats": [{"name": "sklearn", "autoSelect": True}], "multiModel": True,
             "containers": [{"name": "runtime", "image": "meshserve/runtime"}]},
}
TRITON = {
    "metadata": {"name": "triton-2.x"},
    "spec": {"supportedModelFormats": [{"name": "pytorch"}], "containers": [{"name": "triton", "image": "triton"}]},
}
STORAGE = {"metadata": {"name": "storage-config"},
           "stringData": {"localMinIO": '{"type": "s3", "bucket": "models", "access_key_id": "k", "secret_access_key": "s"}'}}


def isvc(name: str, fmt: str = "sklearn", path: str = "mnist-svm.joblib", **model: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"}},
        "spec": {"predictor": {"model": {"modelFormat": {"name": fmt}, "storage": {"key": "localMinIO", "path": path}, **model}}},
    }


@pytest.fixture
def api():
    with FakeApiServer(bookmark_interval=0.1) as srv:
        yield srv


@pytest.fixture
async def controller(api: FakeApiServer, state: State) -> AsyncIterator[Controller]:
    # Pages of two objects: every list in these tests goes through `continue` tokens.
    async with running_controller(api, state, page_size=2) as c:
        yield c


async def aliases(state: State) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await state.r.hgetall(keys.ALIASES)).items()}


def ready(api: FakeApiServer, name: str) -> dict[str, Any] | None:
    o = api.get("inferenceservices", name)
    conds = ((o or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c.get("type") == "Ready"), None)


async def test_converges_on_the_same_registry_as_files(api: FakeApiServer, state: State, controller: Controller) -> None:
    """The cluster path registers the same ModelSpec the mesh-config/ file path does, writes
    status, follows ADDED/MODIFIED/DELETED, and ignores non-ModelMesh InferenceServices."""
    api.apply("servingruntimes", BUILTIN_RUNTIME)
    api.apply("secrets", STORAGE)
    api.apply("inferenceservices", MNIST)
    serverless = isvc("serverless")
    serverless["metadata"]["annotations"] = {}
    api.apply("inferenceservices", serverless)
    api.apply("inferenceservices", isvc("my-model", fmt="pytorch", path="models/my-model"))
    bad = isvc("broken")
    del bad["spec"]["predictor"]["model"]["modelFormat"]
    api.apply("inferenceservices", bad)

    from_files = {s.alias: s for s in read_models(REPO / "mesh-config")}

    await until(lambda: aliases(state), "sklearn-mnist registered")
    assert await aliases(state) == {"sklearn-mnist": from_files["sklearn-mnist"].id}
    assert await state.model(from_files["sklearn-mnist"].id) == from_files["sklearn-mnist"]

    c = await until(lambda: ready(api, "sklearn-mnist"), "sklearn-mnist status")
    assert c["status"] == "True"
    s = api.get("inferenceservices", "sklearn-mnist")["status"]
    assert s["url"] == "grpc://modelmesh-serving.modelmesh-serving:8033"
    assert s["modelStatus"]["states"]["activeModelState"] == "Standby"
    c = await until(lambda: ready(api, "my-model"), "my-model status")
    assert (c["status"], c["reason"]) == ("False", "NoSupportingRuntime")
    c = await until(lambda: ready(api, "broken"), "broken status")
    assert (c["status"], c["reason"]) == ("False", "InvalidPredictorSpec")
    assert "modelFormat" in c["message"]
    assert ready(api, "serverless") is None

    # A runtime for pytorch appears: my-model becomes servable.
    api.apply("servingruntimes", TRITON)
    await until(lambda: ready(api, "my-model") and ready(api, "my-model")["status"] == "True", "my-model ready")
    assert "my-model" in await aliases(state)

    # MODIFIED: a new predictor spec is a new concrete model behind the same alias.
    old_id = (await aliases(state))["sklearn-mnist"]
    moved = copy.deepcopy(MNIST)
    moved["spec"]["predictor"]["model"]["storage"]["path"] = "mnist-svm-v2.joblib"
    api.apply("inferenceservices", moved)
    await until(lambda: _alias_is_not(state, "sklearn-mnist", old_id), "alias moved")

    # A bad update keeps the last good version serving (still Ready) and says why.
    serving_id = (await aliases(state))["sklearn-mnist"]
    broken_update = copy.deepcopy(moved)
    broken_update["spec"]["predictor"]["model"]["runtime"] = "no-such-runtime"
    api.apply("inferenceservices", broken_update)
    await until(lambda: ready(api, "sklearn-mnist").get("reason") == "RuntimeNotRecognized", "bad update reported")
    assert ready(api, "sklearn-mnist")["status"] == "True"
    ms = api.get("inferenceservices", "sklearn-mnist")["status"]["modelStatus"]
    assert (ms["transitionStatus"], ms["states"]["targetModelState"]) == ("BlockedByFailedLoad", "FailedToLoad")
    assert (await aliases(state))["sklearn-mnist"] == serving_id

    # DELETED: the alias goes.
    api.delete("inferenceservices", "my-model")
    await until(lambda: _lacks(state, "my-model"), "my-model alias removed")


async def _alias_is_not(state: State, alias: str, old: str) -> bool:
    return (await aliases(state)).get(alias) not in (None, old)


async def _lacks(state: State, alias: str) -> bool:
    return alias not in await aliases(state)


async def test_gone_410_relists_and_sees_deletions_missed_while_away(api: FakeApiServer, state: State, controller: Controller) -> None:
    """Watch connections are cut; while away an InferenceService is deleted and history is
    compacted, so the resumed watch gets 410 Gone: the watcher relists and the diff against its
    cache reports the deletion."""
    api.apply("servingruntimes", BUILTIN_RUNTIME)
    api.apply("secrets", STORAGE)
    api.apply("inferenceservices", isvc("a"))
    api.apply("inferenceservices", isvc("b"))
    await until(lambda: _has(state, {"a", "b"}), "a and b registered")
    w = controller.watchers["inferenceservices"]
    lists_before = w.lists
    with api.cond:  # no watcher may see the delete: cut them and compact in one step
        api.drop_watches()
        api.objects["inferenceservices"].pop((NS, "a"))
        api.rv += 1
        api.compact()
    await until(lambda: _lacks(state, "a"), "a removed after relist")
    assert w.relists_after_gone >= 1 and w.lists > lists_before
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("meshserve_k8s_watch_gone_total", {"resource": "inferenceservices"}) >= 1
    assert "b" in await aliases(state)


async def _has(state: State, names: set[str]) -> bool:
    return names <= set(await aliases(state))


async def test_dropped_connections_resume_from_bookmark_without_relisting(api: FakeApiServer, state: State, controller: Controller) -> None:
    """Bookmarks move the watcher's resourceVersion although no InferenceService changed; a cut
    connection resumes from that version (no relist), with backoff, and misses nothing."""
    api.apply("servingruntimes", BUILTIN_RUNTIME)
    api.apply("secrets", STORAGE)
    api.apply("inferenceservices", isvc("a"))
    await until(lambda: _has(state, {"a"}), "a registered")
    w = controller.watchers["inferenceservices"]
    # Other resources move the global version; a bookmark carries it to this watcher.
    for i in range(3):
        api.apply("pods", {"metadata": {"name": f"other-{i}"}})
    target = api.rv
    await until(lambda: int(w.rv or 0) >= target, "bookmark advanced the watch version")
    lists = w.lists
    errors = w.errors
    api.drop_watches()
    await until(lambda: w.errors > errors, "dropped connection seen as an error")
    api.apply("inferenceservices", isvc("c"))
    await until(lambda: _has(state, {"a", "c"}), "c registered after the drop")
    resumed = [r for r in api.watch_requests("inferenceservices") if int(r.query.get("resourceVersion") or 0) >= target]
    assert resumed, "the watch resumed from the bookmark's version"
    assert all(r.query.get("allowWatchBookmarks") == "true" for r in api.watch_requests("inferenceservices"))
    assert w.lists == lists


async def test_failing_lists_back_off_then_converge(api: FakeApiServer, state: State, valkey) -> None:
    """The API server answers 500 to the first lists: the watchers retry with backoff and the
    controller acts only once every resource has listed (no removal based on a partial view)."""
    s2 = State.from_url(valkey.url)
    await s2.r.flushdb()
    await s2.register_models(read_models(REPO / "mesh-config"))  # registered earlier, still in the cluster
    api.apply("servingruntimes", BUILTIN_RUNTIME)
    api.apply("inferenceservices", MNIST)
    api.fail_lists = 6
    ac = client.ApiClient(client.Configuration(host=api.url))
    c = Controller(ac, s2, NS, watch_timeout_seconds=3, resync_seconds=0.3, debounce_seconds=0.02, max_backoff_seconds=0.3)
    task = asyncio.create_task(c.run())
    try:
        await until(lambda: ready(api, "sklearn-mnist"), "status after backoff")
        assert sum(w.errors for w in c.watchers.values()) >= 6
        assert "sklearn-mnist" in await aliases(s2)
    finally:
        c.stop()
        await asyncio.wait_for(task, 15)
        ac.close()
        await s2.close()


async def test_deleted_runtime_pod_is_withdrawn_ahead_of_heartbeats(api: FakeApiServer, state: State, controller: Controller) -> None:
    """A runtime pod that Kubernetes deletes loses its heartbeat at once, so the placement
    leader withdraws it on its next check instead of after missed heartbeats."""
    labels = {"app.kubernetes.io/part-of": "meshserve", "app.kubernetes.io/component": "runtime"}
    pod = Pod("runtime-abc", "10.1.2.3", 8080, 8081, 1 << 30, ["sklearn"])
    await state.commit([["HSET", keys.PODS, pod.id, pod.to_json()]], [(KIND_POD, pod.id)])
    await state.r.zadd(keys.HEARTBEATS, {pod.id: time.time() + 3600})
    api.apply("pods", {"metadata": {"name": "runtime-abc", "labels": labels},
                       "status": {"podIP": "10.1.2.3", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    api.apply("pods", {"metadata": {"name": "unrelated"}, "status": {"podIP": "10.9.9.9"}})
    # Deleted only once the controller's watch has the pod: a delete before its first list
    # would be no event at all (a fresh CI machine under load took over 0.5 s to list).
    await until(lambda: any(o["metadata"]["name"] == "runtime-abc" for o in controller.watchers["pods"].snapshot()), "the pod watched")
    await asyncio.sleep(0.3)
    assert await state.r.zscore(keys.HEARTBEATS, pod.id) is not None
    api.delete("pods", "runtime-abc")
    await until(lambda: _no_heartbeat(state, pod.id), "heartbeat dropped")


async def test_pool_pressure_is_exported_per_runtime(state: State, controller: Controller) -> None:
    """The HPA's signal, read from the real Redis schema and exported as a Prometheus gauge."""
    from prometheus_client import REGISTRY

    from meshserve.model import Copy, CopyState, copies_to_json

    pods = [Pod("p1", "10.0.0.1", 8080, 8081, 1000, ["sklearn"], runtime="builtin"),
            Pod("p2", "10.0.0.2", 8080, 8081, 1000, ["sklearn"], runtime="builtin")]
    ops = [["HSET", keys.PODS, p.id, p.to_json()] for p in pods]
    ops.append(["HSET", keys.PLACEMENTS, "m1", copies_to_json({"p1": Copy(CopyState.LOADED, 600), "p2": Copy(CopyState.LOADING, 300)})])
    await state.commit(ops, [(KIND_POD, "p1")])
    pools = await controller.export_pressure()
    assert pools["builtin"].ratio == 0.45
    assert REGISTRY.get_sample_value("meshserve_runtime_cache_pressure", {"runtime": "builtin"}) == 0.45
    await state.commit([["HDEL", keys.PODS, "p1", "p2"]], [(KIND_POD, "p1")])
    await controller.export_pressure()
    assert REGISTRY.get_sample_value("meshserve_runtime_cache_pressure", {"runtime": "builtin"}) is None


async def _no_heartbeat(state: State, pod_id: str) -> bool:
    return await state.r.zscore(keys.HEARTBEATS, pod_id) is None


def test_list_pages_with_continue_tokens(api: FakeApiServer) -> None:
    """A list larger than a page is read with `limit` and `continue`, all pages at the first
    page's resourceVersion, and the watch resumes from that version."""
    import threading

    from meshserve_controller.watch import Watcher

    for i in range(5):
        api.apply("inferenceservices", isvc(f"m{i}"))
    snapshot_rv = api.rv
    seen: list[str] = []
    ac = client.ApiClient(client.Configuration(host=api.url))
    w = Watcher("inferenceservices", client.CustomObjectsApi(ac).list_namespaced_custom_object,
                lambda ev: seen.append(ev.obj["metadata"]["name"]), watch_timeout_seconds=2, page_size=2,
                group="serving.kserve.io", version="v1beta1", namespace=NS, plural="inferenceservices")
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while len(api.watch_requests("inferenceservices")) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(seen) == [f"m{i}" for i in range(5)]
        lists = api.list_requests("inferenceservices")
        assert [r.query.get("limit") for r in lists] == ["2", "2", "2"]
        assert [bool(r.query.get("continue")) for r in lists] == [False, True, True]
        assert api.watch_requests("inferenceservices")[0].query["resourceVersion"] == str(snapshot_rv)
    finally:
        w.stop()
        t.join(10)
        ac.close()
    assert not t.is_alive()


EXAMPLES = REPO.parent / "shared" / "fixtures" / "modelmesh-examples"


def predictor(name: str, fmt: str = "sklearn", path: str = "sklearn/mnist-svm.joblib", **spec: Any) -> dict[str, Any]:
    """A Predictor in ModelMesh's example form (config/example-predictors/)."""
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "Predictor", "metadata": {"name": name},
            "spec": {"modelType": {"name": fmt}, "path": path, "storage": {"s3": {"secretKey": "localMinIO"}}, **spec}}


def pstatus(api: FakeApiServer, name: str) -> dict[str, Any]:
    return (api.get("predictors", name) or {}).get("status") or {}


async def test_predictors_register_and_get_modelmesh_status(api: FakeApiServer, state: State, controller: Controller) -> None:
    """Issue 14 item 4 in cluster mode: Predictors (serving.kserve.io/v1alpha1) register like
    InferenceServices, and their status is written back in ModelMesh's PredictorStatus form;
    a Predictor cannot take an InferenceService's name; a deleted Predictor's alias goes."""
    from meshserve.rules.config import read_config

    api.apply("servingruntimes", BUILTIN_RUNTIME)
    api.apply("secrets", STORAGE)
    api.apply("inferenceservices", MNIST)
    if EXAMPLES.exists():  # ModelMesh's own example, as the user has it
        example = yaml.safe_load((EXAMPLES / "predictors" / "example-mlserver-sklearn-mnist-predictor.yaml").read_text())
    else:
        example = predictor("example-sklearn-mnist-svm")
    api.apply("predictors", example)
    api.apply("predictors", predictor("sklearn-mnist"))  # the InferenceService's name
    api.apply("predictors", predictor("named", runtime={"name": "no-such-runtime"}))

    name = example["metadata"]["name"]
    st_ok = await until(lambda: pstatus(api, name).get("available") and pstatus(api, name), "example Predictor available")
    assert st_ok == {"available": True, "transitionStatus": "UpToDate", "activeModelState": "Standby", "targetModelState": "",
                     "grpcEndpoint": "grpc://modelmesh-serving.modelmesh-serving:8033",
                     "httpEndpoint": "http://modelmesh-serving.modelmesh-serving:8008", "totalCopies": 0, "failedCopies": 0}
    registered = await aliases(state)
    assert registered[name].startswith(f"{name}__ksp-")
    if EXAMPLES.exists():  # the same ModelSpec as `meshserve apply -f` of the file
        (from_file,) = read_config([EXAMPLES / "predictors" / "example-mlserver-sklearn-mnist-predictor.yaml"]).specs
        got = await state.model(registered[name])
        assert got is not None and (got.id, got.format, got.storage) == (from_file.id, from_file.format, from_file.storage)

    clash = await until(lambda: pstatus(api, "sklearn-mnist").get("lastFailureInfo"), "name clash reported")
    assert clash["reason"] == "InvalidPredictorSpec" and "same name from a different source" in clash["message"]
    assert pstatus(api, "sklearn-mnist")["available"] is False
    assert registered["sklearn-mnist"].startswith("sklearn-mnist__isvc-"), "the InferenceService keeps its name"
    unknown = await until(lambda: pstatus(api, "named").get("lastFailureInfo"), "unknown runtime reported")
    assert unknown["reason"] == "RuntimeNotRecognized" and "spec.runtime.name" in unknown["message"]
    assert unknown["modelId"].startswith("named__ksp-") and unknown["time"]
    assert (pstatus(api, "named")["available"], pstatus(api, "named")["activeModelState"]) == (False, "FailedToLoad")
    assert "named" not in await aliases(state)

    if (REPO.parent / "shared" / "schemas").exists():
        import jsonschema

        crd = yaml.safe_load((REPO.parent / "shared" / "schemas" / "modelmesh-predictors-crd.yaml").read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        for n in (name, "sklearn-mnist", "named"):
            jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(pstatus(api, n))

    api.delete("predictors", name)
    await until(lambda: _lacks(state, name), "deleted Predictor's alias removed")
    assert "sklearn-mnist" in await aliases(state)


async def test_no_predictor_crd_and_model_serving_config(api: FakeApiServer, state: State) -> None:
    """Without ModelMesh's Predictor CRD (404) the controller still syncs and serves
    InferenceServices; model-serving-config sets its scale-to-zero options and pool size."""
    api.absent.add("predictors")
    api.apply("servingruntimes", BUILTIN_RUNTIME)
    api.apply("inferenceservices", MNIST)
    api.apply("configmaps", {"metadata": {"name": "model-serving-config"}, "data": {"config.yaml": (
        "podsPerRuntime: 3\nscaleToZero:\n  enabled: true\n  gracePeriodSeconds: 7\nbuiltInServerTypes: [mlserver]\nheadlessService: false\n")}})
    api.apply("configmaps", {"metadata": {"name": "unrelated"}, "data": {"x": "y"}})
    async with running_controller(api, state, scale_to_zero=False) as c:
        await until(lambda: aliases(state), "sklearn-mnist registered without the Predictor CRD")
        assert c.watchers["predictors"].absent
        await until(lambda: c.pool_replicas == 3, "model-serving-config read")
        assert (c.scale_to_zero, c.scale_grace, c.server_types) == (True, 7.0, frozenset({"mlserver"}))
        # The ConfigMap goes: the flags are back.
        api.delete("configmaps", "model-serving-config")
        await until(lambda: c.pool_replicas == 1 and c.scale_to_zero is False, "defaults back")
