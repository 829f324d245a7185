"""TrafficRules in cluster mode: the controller watches them, writes them into Redis through the
rules store and writes their `.status` back. Kind: fake list/watch API server
(meshserve_testing.fakeapi) with the real `kubernetes` client over HTTP, and a real Valkey (local
processes on 127.0.0.1 only, all stopped; each test bounded to seconds)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Callable

import pytest
from kubernetes import client

from meshserve.rules import moves
from meshserve_rollout import controller as rollout
from meshserve import state as st
from meshserve_testing.devmesh import valkey
from meshserve.k8s import rules as kr
from meshserve_controller.controller import Controller
from meshserve_testing.fakeapi import FakeApiServer
from meshserve.rules import store as rstore

NS = "modelmesh-serving"
RUNTIME = {"metadata": {"name": "meshserve-builtin"}, "spec": {"supportedModelFormats": [{"name": "sklearn", "autoSelect": True}]}}


def isvc(name: str, path: str) -> dict[str, Any]:
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"}},
            "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}, "storage": {"path": path}}}}}


def trafficrule(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "meshserve.io/v1alpha1", "kind": "TrafficRule", "metadata": {"name": name}, "spec": spec}


SPLIT = {"model": "a", "routes": [{"to": [{"model": "a", "weight": 90}, {"model": "b", "weight": 10}]}]}
CANARY = {"model": "a", "canary": {"model": "b", "steps": [{"weight": 10}, {"weight": 50}, {"weight": 100}]}}


@pytest.fixture(scope="module")
def store():
    with valkey() as v:
        yield v


@pytest.fixture
async def state(store) -> AsyncIterator[st.State]:
    s = st.State.from_url(store.url)
    await s.r.flushdb()
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def running(api: FakeApiServer, state: st.State) -> AsyncIterator[Controller]:
    ac = client.ApiClient(client.Configuration(host=api.url))
    c = Controller(ac, state, NS, watch_timeout_seconds=3, resync_seconds=0.3, debounce_seconds=0.02, max_backoff_seconds=0.3)
    task = asyncio.create_task(c.run())
    try:
        yield c
    finally:
        c.stop()
        await asyncio.wait_for(task, 15)
        ac.close()


async def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")


def status(api: FakeApiServer, name: str) -> dict[str, Any]:
    return (api.get("trafficrules", name) or {}).get("status") or {}


async def stored(state: st.State) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in (await state.r.hgetall(st.RULES)).items()}


async def test_trafficrules_are_registered_and_get_status(state: st.State) -> None:
    with FakeApiServer(bookmark_interval=0.1) as api:
        api.apply("servingruntimes", RUNTIME)
        api.apply("inferenceservices", isvc("a", "a.joblib"))
        api.apply("inferenceservices", isvc("b", "b.joblib"))
        api.apply("trafficrules", trafficrule("split", SPLIT))
        async with running(api, state):
            rules = await until(lambda: stored(state), "rule in Redis")
            assert rules["split"]["spec"] == SPLIT and rules["split"]["metadata"] == {"name": "split", "namespace": NS}
            s = await until(lambda: status(api, "split").get("phase") == "Active" and status(api, "split"), "status Active")
            assert s["observedGeneration"] == 1 and s["message"] == ""

            # A canary: its step, steps and weight are mirrored from Redis, and follow `meshserve promote`.
            api.apply("trafficrules", trafficrule("canary", {**CANARY, "model": "b", "canary": {**CANARY["canary"], "model": "a"}}))
            s = await until(lambda: status(api, "canary").get("phase") == "Paused" and status(api, "canary"), "canary Paused")
            assert (s["step"], s["steps"], s["canaryWeight"]) == (1, 3, 10)
            live = json.loads(await state.r.hget(st.RULE_STATUS, "canary"))
            await rstore.set_status(state, "canary", rollout.advance((await stored(state))["canary"]["spec"], live, time.time()))
            s = await until(lambda: status(api, "canary").get("step") == 2 and status(api, "canary"), "canary step 2")
            assert s["canaryWeight"] == 50
            # Re-applying the same spec does not restart the canary.
            api.apply("trafficrules", trafficrule("canary", {**CANARY, "model": "b", "canary": {**CANARY["canary"], "model": "a"}}))
            await asyncio.sleep(1)
            assert status(api, "canary")["step"] == 2

            # Refused as `meshserve apply` refuses it: status says why, Redis never sees it.
            api.apply("trafficrules", trafficrule("typo", {"model": "nope", "routes": [{"to": [{"model": "a"}]}]}))
            s = await until(lambda: status(api, "typo").get("phase") == kr.INVALID and status(api, "typo"), "Invalid")
            assert s["message"].startswith("spec.model: unknown model 'nope'")
            api.apply("trafficrules", trafficrule("second", {"model": "a", "mirror": {"model": "b", "percent": 5}}))
            s = await until(lambda: status(api, "second").get("phase") == kr.INVALID and status(api, "second"), "one rule per model")
            assert "already has rule 'split'" in s["message"]
            assert set(await stored(state)) == {"split", "canary"}

            # A rule `meshserve apply` wrote into Redis directly is not the controller's to remove.
            ops, changes = rstore.rule_ops([trafficrule("local", {"model": "b-unused", "routes": [{"to": [{"model": "b"}]}]})], {})
            await state.commit(ops, changes)
            api.delete("trafficrules", "split")
            rules = await until(lambda: _without(state, "split"), "split removed from Redis")
            assert "local" in rules and "canary" in rules


async def _without(state: st.State, name: str) -> dict[str, Any] | None:
    rules = await stored(state)
    return rules if name not in rules else None


async def test_without_the_crd_rules_in_redis_are_left_alone(state: st.State) -> None:
    with FakeApiServer(bookmark_interval=0.1) as api:
        api.absent.add("trafficrules")
        api.apply("servingruntimes", RUNTIME)
        api.apply("inferenceservices", isvc("a", "a.joblib"))
        ops, changes = rstore.rule_ops([{**trafficrule("local", {"model": "a", "mirror": {"model": "a", "percent": 1}}),
                                         "metadata": {"name": "local", "namespace": NS}}], {})
        await state.commit(ops, changes)
        async with running(api, state) as c:
            await until(lambda: c.reconciles >= 2, "two passes")
        assert "local" in await stored(state)
