"""TrafficRules in cluster mode: the controller watches them, writes them into Redis through the
rules store and writes their `.status` back. Kind: fake list/watch API server
(meshserve_testing.fakeapi) with the real `kubernetes` client over HTTP, and a real Valkey (local
processes on 127.0.0.1 only, all stopped; each test bounded to seconds)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


from meshserve_rollout import controller as rollout
from meshserve.store import State, keys
from meshserve.k8s import rules as kr
from meshserve_testing.fakeapi import FakeApiServer
from meshserve_testing.k8s import running_controller, until
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


def status(api: FakeApiServer, name: str) -> dict[str, Any]:
    return (api.get("trafficrules", name) or {}).get("status") or {}


async def stored(state: State) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in (await state.r.hgetall(keys.RULES)).items()}


async def test_trafficrules_are_registered_and_get_status(state: State) -> None:
    with FakeApiServer(bookmark_interval=0.1) as api:
        api.apply("servingruntimes", RUNTIME)
        api.apply("inferenceservices", isvc("a", "a.joblib"))
        api.apply("inferenceservices", isvc("b", "b.joblib"))
        api.apply("trafficrules", trafficrule("split", SPLIT))
        async with running_controller(api, state):
            rules = await until(lambda: stored(state), "rule in Redis")
            assert rules["split"]["spec"] == SPLIT and rules["split"]["metadata"] == {"name": "split", "namespace": NS}
            s = await until(lambda: status(api, "split").get("phase") == "Active" and status(api, "split"), "status Active")
            assert s["observedGeneration"] == 1 and s["message"] == ""

            # A canary: its step, steps and weight are mirrored from Redis, and follow `meshserve promote`.
            api.apply("trafficrules", trafficrule("canary", {**CANARY, "model": "b", "canary": {**CANARY["canary"], "model": "a"}}))
            s = await until(lambda: status(api, "canary").get("phase") == "Paused" and status(api, "canary"), "canary Paused")
            assert (s["step"], s["steps"], s["canaryWeight"]) == (1, 3, 10)
            live = json.loads(await state.r.hget(keys.RULE_STATUS, "canary"))
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


async def _without(state: State, name: str) -> dict[str, Any] | None:
    rules = await stored(state)
    return rules if name not in rules else None


async def test_without_the_crd_rules_in_redis_are_left_alone(state: State) -> None:
    with FakeApiServer(bookmark_interval=0.1) as api:
        api.absent.add("trafficrules")
        api.apply("servingruntimes", RUNTIME)
        api.apply("inferenceservices", isvc("a", "a.joblib"))
        ops, changes = rstore.rule_ops([{**trafficrule("local", {"model": "a", "mirror": {"model": "a", "percent": 1}}),
                                         "metadata": {"name": "local", "namespace": NS}}], {})
        await state.commit(ops, changes)
        async with running_controller(api, state) as c:
            await until(lambda: c.reconciles >= 2, "two passes")
        assert "local" in await stored(state)
