"""Scale to zero (issue 7): a runtime pool that no InferenceService uses goes to zero pods and
comes back to one when one does; a request for a model whose pool is at zero waits for it.

Kinds: unit (pure: meshserve_controller.scaling, the placement policy) and integration (the controller
with the real `kubernetes` client over HTTP against meshserve_testing.fakeapi and a real Valkey;
127.0.0.1 only, every server stopped, each test bounded to seconds)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

from meshserve.store import State, keys
from meshserve.store.state import parse_runtimes
from meshserve.k8s import objects as ob
from meshserve_controller import scaling
from meshserve_controller.controller import Controller
from meshserve_testing.fakeapi import FakeApiServer
from meshserve.model import ModelSpec
from meshserve_placement import policy
from tests.test_k8s_watch import BUILTIN_RUNTIME, STORAGE, api, isvc  # noqa: F401 (fixtures)
from meshserve_testing.k8s import running_controller, until

MB = 1 << 20
MLSERVER_RUNTIME = {
    "metadata": {"name": "mlserver-1.x"},
    "spec": {"supportedModelFormats": [{"name": "sklearn", "version": "1", "autoSelect": True}, {"name": "xgboost", "autoSelect": False}],
             "multiModel": True, "containers": [{"name": "mlserver", "image": "seldonio/mlserver:1.7.1"}]},
}


def pool(name: str, runtime: str, replicas: int) -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": "meshserve", "app.kubernetes.io/component": "runtime", ob.RUNTIME_LABEL: runtime}
    return {"metadata": {"name": name, "labels": labels}, "spec": {"replicas": replicas, "serviceName": "meshserve-runtime"}}


# --- unit: the pure parts ------------------------------------------------------------------
def test_plan_wakes_a_used_pool_at_once_and_sleeps_an_unused_one_after_the_grace() -> None:
    pools = [ob.Pool("rt-builtin", "meshserve-builtin", 2), ob.Pool("rt-mlserver", "mlserver-1.x", 0)]
    todo, since = scaling.plan_scaling(pools, {"meshserve-builtin", "mlserver-1.x"}, {}, now=100.0, grace_seconds=60)
    assert [(s.workload, s.replicas) for s in todo] == [("rt-mlserver", 1)]
    assert "uses ServingRuntime mlserver-1.x" in todo[0].why
    # The last InferenceService using mlserver goes: nothing until the grace has passed.
    pools[1] = ob.Pool("rt-mlserver", "mlserver-1.x", 1)
    todo, since = scaling.plan_scaling(pools, {"meshserve-builtin"}, since, now=200.0, grace_seconds=60)
    assert todo == [] and since == {"mlserver-1.x": 200.0}
    todo, since = scaling.plan_scaling(pools, {"meshserve-builtin"}, since, now=259.0, grace_seconds=60)
    assert todo == []
    todo, since = scaling.plan_scaling(pools, {"meshserve-builtin"}, since, now=261.0, grace_seconds=60)
    assert [(s.workload, s.replicas) for s in todo] == [("rt-mlserver", 0)]
    # Used again within the grace: the clock restarts next time it is unused.
    todo, since = scaling.plan_scaling(pools, {"meshserve-builtin", "mlserver-1.x"}, {"mlserver-1.x": 200.0}, now=230.0)
    assert todo == [] and since == {}


def test_runtime_of_follows_kserve_rule() -> None:
    runtimes = {r.name: r for r in map(ob.parse_runtime, [BUILTIN_RUNTIME, MLSERVER_RUNTIME])}
    spec = ModelSpec("m__isvc-1", "m", "sklearn", {})
    assert ob.runtime_of(spec, runtimes) == "meshserve-builtin"  # first by name that auto-selects
    spec.runtime = "mlserver-1.x"
    assert ob.runtime_of(spec, runtimes) == "mlserver-1.x"
    assert ob.runtime_of(ModelSpec("x__isvc-1", "x", "xgboost", {}), runtimes) is None  # declared, not auto-selected
    assert ob.parse_pool(pool("p", "mlserver-1.x", 0)) == ob.Pool("p", "mlserver-1.x", 0)
    assert ob.parse_pool({"metadata": {"name": "redis"}, "spec": {"replicas": 1}}) is None


def _cluster(builtin_pods: int) -> policy.ClusterView:
    pods = {f"b{i}": policy.PodView(f"b{i}", 1000 * MB, ["sklearn"], runtime="meshserve-builtin") for i in range(builtin_pods)}
    pods["m0"] = policy.PodView("m0", 1000 * MB, ["sklearn", "xgboost"], runtime="mlserver-1.x", auto_formats=["sklearn"])
    models = {"plain": policy.ModelView("plain", "sklearn", 10 * MB)}
    return policy.ClusterView(pods=pods, models=models, runtimes={
        "meshserve-builtin": policy.RuntimeView("meshserve-builtin", ("sklearn",), ("sklearn",)),
        "mlserver-1.x": policy.RuntimeView("mlserver-1.x", ("sklearn", "xgboost"), ("sklearn",)),
    })


def test_a_model_whose_pool_is_at_zero_waits_for_it_rather_than_land_elsewhere() -> None:
    cv = _cluster(builtin_pods=0)
    d = policy.place(cv.models["plain"], cv, now=1.0)
    assert d.pod is None and d.waits_for == "meshserve-builtin"
    assert "ServingRuntime meshserve-builtin has no pods yet" in d.reason
    cv.pods["b0"] = policy.PodView("b0", 1000 * MB, ["sklearn"], runtime="meshserve-builtin")
    assert policy.place(cv.models["plain"], cv, now=2.0).pod == "b0"


# --- integration: the controller against the fake API server and a real Valkey -------------
@pytest.fixture
async def scaling_controller(api: FakeApiServer, state: State) -> AsyncIterator[Controller]:
    async with running_controller(api, state, resync_seconds=0.2, scale_grace_seconds=1.0) as c:
        yield c


def replicas(api: FakeApiServer, name: str) -> int:
    return int(api.get("statefulsets", name)["spec"]["replicas"])


async def test_controller_scales_a_pool_from_zero_when_an_inferenceservice_names_it_and_back(
    api: FakeApiServer, state: State, scaling_controller: Controller
) -> None:
    for rt in (BUILTIN_RUNTIME, MLSERVER_RUNTIME):
        api.apply("servingruntimes", rt)
    api.apply("secrets", STORAGE)
    api.apply("statefulsets", pool("meshserve-runtime-builtin", "meshserve-builtin", 2))
    api.apply("statefulsets", pool("meshserve-runtime-mlserver", "mlserver-1.x", 0))
    api.apply("inferenceservices", isvc("sklearn-mnist"))  # auto-selects meshserve-builtin

    # Placement learns the declared runtimes, with what each auto-selects.
    raw = await until(lambda: state.r.hgetall(keys.RUNTIMES), "ms:runtimes published")
    assert parse_runtimes(raw)["mlserver-1.x"] == (["sklearn", "xgboost"], ["sklearn"])
    await asyncio.sleep(1.5)  # longer than the grace: an unused pool at zero stays there
    assert replicas(api, "meshserve-runtime-mlserver") == 0
    assert replicas(api, "meshserve-runtime-builtin") == 2

    api.apply("inferenceservices", isvc("on-mlserver", runtime="mlserver-1.x"))
    await until(lambda: replicas(api, "meshserve-runtime-mlserver") == 1, "mlserver pool woken")
    scale_patches = [r for r in api.requests if r.method == "PATCH" and r.resource == "statefulsets"]
    assert scale_patches and all(r.query["sub"] == "scale" for r in scale_patches)

    # The only InferenceService using it goes: back to zero after the grace, never before.
    api.delete("inferenceservices", "on-mlserver")
    await asyncio.sleep(0.5)
    assert replicas(api, "meshserve-runtime-mlserver") == 1
    await until(lambda: replicas(api, "meshserve-runtime-mlserver") == 0, "mlserver pool back to zero", timeout=10)
    assert replicas(api, "meshserve-runtime-builtin") == 2  # still in use: never touched
