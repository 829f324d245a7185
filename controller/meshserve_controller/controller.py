"""The cluster-mode controller: Kubernetes objects in, registry and InferenceService status out.
(Over 400 lines: one reconcile pass over every resource kind it watches reads best in one place.)

Models come from InferenceServices (ModelMesh mode) and ModelMesh's Predictors, whose status is
written back in each kind's own form. System-wide settings come from ModelMesh's
model-serving-config ConfigMap (meshserve/servingconfig.py), read on every pass.

Level-triggered: any event marks the world dirty, and one reconcile compares everything the
watchers hold with Redis and writes only the difference. So a missed or repeated event, a
relist after 410 or a controller restart all converge on the same registry. Every write is
idempotent, so a second replica only repeats no-ops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from prometheus_client import Counter, Gauge
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from meshserve.extras import needs

with needs("control", "cluster mode (meshserve controller)"):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

from meshserve import servingconfig
from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store import messages
from meshserve.store.state import State, runtime_json
from meshserve.k8s import objects as ob
from meshserve_controller import pressure, scaling
from meshserve_controller import registry_store as store
from meshserve_controller.storage_facts import PredictFrom, StorageFacts
from meshserve.k8s import rules as kr
from meshserve_controller.watch import DELETED, Event, Watcher
from meshserve.model import ModelSpec, Pod, copies_from_json

log = logging.getLogger("meshserve.k8s")

M_RECONCILES = Counter("meshserve_controller_reconciles", "Reconcile passes")
M_REGISTERED = Counter("meshserve_controller_models_registered", "InferenceService specs written to the registry")
M_REMOVED = Counter("meshserve_controller_aliases_removed", "Aliases removed after an InferenceService went away")
M_STATUS = Counter("meshserve_controller_status_writes", "InferenceService status patches", ["result"])
M_EXPEDITED = Counter("meshserve_controller_pods_expedited", "Runtime pods withdrawn on a Kubernetes event, ahead of heartbeats")

# Per runtime pool, for the HPA (istio/autoscaling.yaml) through prometheus-adapter.
M_PRESSURE = Gauge("meshserve_runtime_cache_pressure", "Booked bytes over capacity across a runtime pool's pods", ["runtime"])
M_POOL_PODS = Gauge("meshserve_runtime_pods", "Registered pods of a runtime pool", ["runtime"])
M_POOL_USED = Gauge("meshserve_runtime_used_bytes", "Bytes booked (loaded + loading) in a runtime pool", ["runtime"])
M_POOL_CAPACITY = Gauge("meshserve_runtime_capacity_bytes", "Capacity of a runtime pool", ["runtime"])

M_SCALES = Counter("meshserve_controller_pool_scales", "Runtime pools scaled between zero and one pod", ["to", "result"])

ISVC, RUNTIME, SECRET, POD, POOL = "inferenceservices", "servingruntimes", "storage-config", "pods", "statefulsets"
PREDICTOR, CONFIG = "predictors", "model-serving-config"
TRAFFIC = "trafficrules"
M_RULES = Counter("meshserve_controller_rules_written", "TrafficRules written to or removed from Redis", ["op"])


def _log_reconcile_retry(rs: RetryCallState) -> None:
    e = rs.outcome.exception() if rs.outcome else None
    log.warning("controller: reconcile failed (%s); retrying in %.1fs", e, rs.next_action.sleep if rs.next_action else 0)


class Controller:
    def __init__(
        self,
        api: client.ApiClient,
        state: State,
        namespace: str,
        *,
        watch_timeout_seconds: int = 300,
        resync_seconds: float = 10.0,
        debounce_seconds: float = 0.1,
        max_backoff_seconds: float = 30.0,
        page_size: int = 500,
        pressure_seconds: float = 15.0,
        scale_to_zero: bool = True,
        scale_grace_seconds: float = scaling.DEFAULT_GRACE_SECONDS,
        predict_from: PredictFrom | None = None,
    ):
        self.state, self.namespace = state, namespace
        # Sizes and PEFT bases read from the models' stores before registration (None: left to
        # the loaders, as before).
        self._facts = StorageFacts(predict_from) if predict_from is not None else None
        self.core, self.custom, self.apps = client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)
        self.scale_to_zero, self.scale_grace = scale_to_zero, scale_grace_seconds
        # The flags' values; model-serving-config overrides them while it says otherwise.
        self._flag_scale = (scale_to_zero, scale_grace_seconds)
        self.pool_replicas = 1
        self.server_types: frozenset[str] | None = None
        self._config_seen: object = None
        self._unused_since: dict[str, float] = {}
        self._published_runtimes: dict[str, str] | None = None
        self.resync, self.debounce = resync_seconds, debounce_seconds
        self.max_backoff = max_backoff_seconds
        self._dirty: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone_ips: set[str] = set()
        self._gone_lock = threading.Lock()
        self._synced: set[str] = set()
        self._stopping = threading.Event()
        self.reconciles = 0
        self.pressure_seconds = pressure_seconds
        self._pressure_at = float("-inf")
        self._pools: set[str] = set()
        # Verdicts by object and resourceVersion, valid while runtimes and storage keys stay
        # the same: a pass over 100,000 InferenceServices re-parses only what changed.
        self._verdicts: dict[tuple[str, str, str], tuple[str, ob.Verdict]] = {}  # (kind, ns, name)
        self._verdict_ctx: object = None
        common = dict(on_event=self._on_event, on_synced=self._on_synced, watch_timeout_seconds=watch_timeout_seconds,
                      max_backoff_seconds=max_backoff_seconds, page_size=page_size)
        kserve = dict(group=ob.KSERVE_GROUP, namespace=namespace)
        self.watchers = {
            ISVC: Watcher(ISVC, self.custom.list_namespaced_custom_object, **common, **kserve,
                          version=ob.ISVC_VERSION, plural=ob.ISVC_PLURAL),
            RUNTIME: Watcher(RUNTIME, self.custom.list_namespaced_custom_object, **common, **kserve,
                             version=ob.RUNTIME_VERSION, plural=ob.RUNTIME_PLURAL),
            # ModelMesh's Predictor CRD may not be installed: then there are no Predictors.
            PREDICTOR: Watcher(PREDICTOR, self.custom.list_namespaced_custom_object, **common, **kserve, optional=True,
                               version=ob.PREDICTOR_VERSION, plural=ob.PREDICTOR_PLURAL),
            # meshserve's own TrafficRule CRD (istio/crds/): while it is not installed the
            # controller leaves the rules in Redis alone.
            TRAFFIC: Watcher(TRAFFIC, self.custom.list_namespaced_custom_object, **common, optional=True, group=kr.GROUP,
                             namespace=namespace, version=kr.VERSION, plural=kr.PLURAL),
            CONFIG: Watcher(CONFIG, self.core.list_namespaced_config_map, **common, namespace=namespace,
                            field_selector=f"metadata.name={ob.CONFIG_MAP}"),
            # The field selector is what lets RBAC grant this one Secret by name (resourceNames).
            SECRET: Watcher(SECRET, self.core.list_namespaced_secret, **common, namespace=namespace,
                            field_selector=f"metadata.name={ob.STORAGE_SECRET}"),
            POD: Watcher(POD, self.core.list_namespaced_pod, **common, namespace=namespace,
                         label_selector=ob.RUNTIME_POD_SELECTOR),
            # Runtime pools, for scale to zero.
            POOL: Watcher(POOL, self.apps.list_namespaced_stateful_set, **common, namespace=namespace,
                          label_selector=ob.RUNTIME_POOL_SELECTOR),
        }

    # --- events (watcher threads) ---------------------------------------------------------
    def _on_event(self, ev: Event) -> None:
        if ev.resource == POD:
            p = ob.parse_pod(ev.obj)
            if (ev.type == DELETED or p.gone) and p.ip:
                with self._gone_lock:
                    self._gone_ips.add(p.ip)
        self._poke()

    def _on_synced(self, resource: str) -> None:
        self._synced.add(resource)
        self._poke()

    def _poke(self) -> None:
        if self._loop is not None and self._dirty is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    def stop(self) -> None:
        """Ask `run()` to finish its pass and return (thread-safe; also a signal handler).
        An explicit flag rather than relying on task cancellation alone, which a library
        call in the loop may absorb."""
        self._stopping.set()
        self._poke()

    @property
    def synced(self) -> bool:
        return self._synced >= set(self.watchers)

    # --- main loop --------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        threads = [threading.Thread(target=w.run, name=f"watch-{n}", daemon=True) for n, w in self.watchers.items()]
        for t in threads:
            t.start()
        try:
            while not self._stopping.is_set():
                try:
                    # asyncio.timeout rather than wait_for, whose 3.11 version can lose a cancel
                    # that races the event; stop() is the way out that never depends on either.
                    async with asyncio.timeout(self.resync):
                        await self._dirty.wait()
                    await asyncio.sleep(self.debounce)  # let a burst of events land first
                except TimeoutError:
                    pass  # periodic resync: copies loaded since, status to refresh
                self._dirty.clear()
                if self._stopping.is_set():
                    break
                if not self.synced:
                    continue  # never act on a partial view: it would remove what is not listed yet
                try:
                    await self._reconcile_retrying()
                except Exception as e:  # only when stopping mid-retry
                    log.warning("controller: reconcile failed (%s) while stopping", e)
        finally:
            for w in self.watchers.values():
                w.stop()
            # Bounded, and polled rather than joined in an executor thread (those may all be
            # busy with status writes): a thread still blocked in a request is a daemon.
            deadline = asyncio.get_running_loop().time() + 5
            while any(t.is_alive() for t in threads) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)

    async def _reconcile_retrying(self) -> None:
        """Reconcile until it succeeds (Redis down, an API hiccup), backing off exponentially
        with jitter, so controller replicas coming back together do not retry in step. Each try
        reads everything afresh (reconciling is level-triggered), so events meanwhile are not lost."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.5, max=self.max_backoff) + wait_random(0, min(1.0, self.max_backoff)),
            stop=lambda _: self._stopping.is_set(),
            sleep=self._pause,
            before_sleep=_log_reconcile_retry,
            reraise=True,
        ):
            with attempt:
                await self.reconcile()

    async def _pause(self, seconds: float) -> None:
        """A backoff that ends at once when stop() is called."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._stopping.is_set() and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.sleep(min(left, 0.1))

    def _apply_config(self) -> None:
        """model-serving-config onto the controller's options, on every pass (a deleted
        ConfigMap gives the flags back). Warnings are logged once per ConfigMap version."""
        objs = self.watchers[CONFIG].snapshot()
        version = ob.resource_version(objs[0]) if objs else None
        if version == self._config_seen and version is not None:
            return
        self._config_seen = version
        self.scale_to_zero, self.scale_grace = self._flag_scale
        self.pool_replicas, self.server_types = 1, None
        if not objs:
            return
        try:
            cfg = servingconfig.from_object(objs[0])
        except ValueError as e:  # ConfigError: the whole ConfigMap is ignored until fixed
            log.warning("controller: %s; using the defaults until it is fixed", e)
            return
        if cfg.scale_to_zero is not None:
            self.scale_to_zero = cfg.scale_to_zero
        if cfg.scale_grace_seconds is not None:
            self.scale_grace = cfg.scale_grace_seconds
        self.pool_replicas = cfg.pool_replicas or 1
        self.server_types = cfg.server_types
        for w in cfg.warnings:
            log.warning("controller: %s", w)
        log.info("controller: model-serving-config: scale to zero %s (grace %gs), pools scale up to %d, built-in server types %s",
                 self.scale_to_zero, self.scale_grace, self.pool_replicas, ", ".join(sorted(self.server_types)) if self.server_types else "all")

    async def reconcile(self) -> None:
        self._apply_config()
        isvcs = [o for o in self.watchers[ISVC].snapshot() if ob.is_modelmesh(o)]
        taken = {ob.key_of(o)[1] for o in isvcs}
        predictors = self.watchers[PREDICTOR].snapshot()
        for o in predictors:
            o.setdefault("kind", "Predictor")  # watch events carry it; the registry checks it
        runtimes = ob.allow_server_types({r.name: r for r in map(ob.parse_runtime, self.watchers[RUNTIME].snapshot())}, self.server_types)
        secrets = self.watchers[SECRET].snapshot()
        storage = ob.parse_storage_keys(secrets[0] if secrets else None)
        verdicts = [(o, self._judge(o, runtimes, storage)) for o in isvcs]
        # One alias, one source: an InferenceService keeps its name, a Predictor of the same name is refused.
        verdicts += [(o, ob.name_taken(o) if ob.key_of(o)[1] in taken else self._judge(o, runtimes, storage)) for o in predictors]
        models = isvcs + predictors
        live = {(o.get("kind", ""), *ob.key_of(o)) for o in models}
        for k in [k for k in self._verdicts if k not in live]:
            del self._verdicts[k]

        registered = {a: s for a, s in (await store.alias_specs(self.state)).items() if s.namespace == self.namespace}
        desired: dict[str, ModelSpec] = {}
        for o, v in verdicts:
            name = ob.key_of(o)[1]
            if v.ready and v.spec is not None:
                desired[name] = v.spec
            elif v.conflict:
                continue  # a Predictor refused for its InferenceService's name
            elif name in registered:
                # A bad update keeps the last good version serving (ModelMesh does the same).
                desired[name] = registered[name]
        if self._facts is not None:
            by_id = {s.id: s for s in registered.values()}
            for note in await self._facts.fill(list(desired.values()), by_id, secrets[0] if secrets else None):
                log.info("controller: %s", note)
        p = ob.diff_registrations(desired, registered)
        if p.register:
            await self.state.register_models(p.register)
            M_REGISTERED.inc(len(p.register))
            for s in p.register:
                log.info("controller: registered %s -> %s", s.alias, s.id)
        if p.remove_aliases:
            await self.state.remove_aliases(p.remove_aliases)
            M_REMOVED.inc(len(p.remove_aliases))
            log.info("controller: removed aliases %s", ", ".join(p.remove_aliases))

        await self._publish_runtimes(runtimes)
        await self._scale_pools(runtimes, desired)
        await self._expedite_gone_pods()
        await self._write_statuses(verdicts, desired)
        await self._reconcile_rules()
        now = time.monotonic()
        if now - self._pressure_at >= self.pressure_seconds:
            self._pressure_at = now
            await self.export_pressure()
        self.reconciles += 1
        M_RECONCILES.inc()

    async def export_pressure(self) -> dict[str, pressure.PoolPressure]:
        async with self.state.r.pipeline(transaction=True) as p:
            p.hgetall(keys.PODS).hgetall(keys.PLACEMENTS)
            raw_pods, raw_placements = await p.execute()
        pods = {k.decode(): Pod.from_json(v) for k, v in raw_pods.items()}
        placements = {k.decode(): copies_from_json(v) for k, v in raw_placements.items()}
        pools = pressure.pool_pressure(pods, placements)
        for rt in self._pools - set(pools):  # a pool with no pods left: its series go
            for g in (M_PRESSURE, M_POOL_PODS, M_POOL_USED, M_POOL_CAPACITY):
                g.remove(rt)
        for rt, pp in pools.items():
            M_PRESSURE.labels(rt).set(pp.ratio)
            M_POOL_PODS.labels(rt).set(pp.pods)
            M_POOL_USED.labels(rt).set(pp.used_bytes)
            M_POOL_CAPACITY.labels(rt).set(pp.capacity_bytes)
        self._pools = set(pools)
        return pools

    async def _publish_runtimes(self, runtimes: dict[str, ob.Runtime]) -> None:
        """The ServingRuntimes placement resolves models against (state.RUNTIMES): so a model
        whose runtime has no pods yet waits for that pool instead of landing on another that
        also auto-selects its format."""
        want = {r.name: runtime_json(sorted(r.formats), sorted(r.auto_formats)) for r in runtimes.values() if not r.disabled}
        if want == self._published_runtimes:
            return
        await self.state.set_runtimes(want)
        self._published_runtimes = want
        log.info("controller: published ServingRuntimes %s", ", ".join(sorted(want)) or "(none)")

    async def _scale_pools(self, runtimes: dict[str, ob.Runtime], desired: dict[str, ModelSpec]) -> None:
        if not self.scale_to_zero:
            return
        in_use = {rt for rt in (ob.runtime_of(s, runtimes) for s in desired.values()) if rt}
        pools = [p for p in map(ob.parse_pool, self.watchers[POOL].snapshot()) if p is not None]
        todo, self._unused_since = scaling.plan_scaling(pools, in_use, self._unused_since, time.monotonic(), self.scale_grace, self.pool_replicas)
        for sc in todo:
            try:
                await asyncio.to_thread(
                    self.apps.patch_namespaced_stateful_set_scale, sc.workload, self.namespace, {"spec": {"replicas": sc.replicas}},
                    _content_type="application/merge-patch+json", _request_timeout=10,
                )
                M_SCALES.labels(str(sc.replicas), "ok").inc()
                log.info("controller: scaled %s to %d: %s", sc.workload, sc.replicas, sc.why)
            except Exception as e:  # noqa: BLE001 - the next pass retries
                M_SCALES.labels(str(sc.replicas), "error").inc()
                log.warning("controller: could not scale %s to %d (%s); retrying on the next pass", sc.workload, sc.replicas, e)

    def _judge(self, obj: dict[str, Any], runtimes: dict[str, ob.Runtime], storage: dict[str, str]) -> ob.Verdict:
        ctx = (frozenset(runtimes.values()), frozenset(storage.items()))
        if ctx != self._verdict_ctx:
            self._verdicts.clear()
            self._verdict_ctx = ctx
        k, rv = (str(obj.get("kind", "")), *ob.key_of(obj)), ob.resource_version(obj)
        hit = self._verdicts.get(k)
        if hit is not None and hit[0] == rv and rv:
            return hit[1]
        v = ob.judge(obj, runtimes, storage)
        self._verdicts[k] = (rv, v)
        return v

    async def _expedite_gone_pods(self) -> None:
        with self._gone_lock:
            ips, self._gone_ips = self._gone_ips, set()
        if not ips:
            return
        pods = [Pod.from_json(v) for v in (await self.state.r.hgetall(keys.PODS)).values()]
        ids = [p.id for p in pods if p.host in ips]
        if ids:
            # Dropping the heartbeat makes the placement leader withdraw the pod on its next
            # check (fenced, through its own commit) instead of after missed heartbeats.
            await store_ops.forget_heartbeats(self.state.r, ids)
            M_EXPEDITED.inc(len(ids))
            log.info("controller: runtime pods %s are going away; withdrawing them now", ", ".join(ids))

    async def _write_statuses(self, verdicts: list[tuple[dict[str, Any], ob.Verdict]], desired: dict[str, ModelSpec]) -> None:
        """`desired` holds, for a bad update, the earlier spec that keeps serving."""
        ids = sorted({v.spec.id for _, v in verdicts if v.spec is not None} | {s.id for s in desired.values()})
        raws = await self.state.r.hmget(keys.PLACEMENTS, ids) if ids else []
        copies = dict(zip(ids, (copies_from_json(r) for r in raws)))
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for obj, v in verdicts:
            ns, name = ob.key_of(obj)
            # What keeps serving under this name after a bad update; never another object's model.
            kept = desired.get(name) if not v.ready and not v.conflict else None
            predictor = ob.is_predictor(obj)
            # Each kind's own status form (ModelMesh's PredictorStatus, KServe's InferenceService status).
            make = ob.predictor_status if predictor else ob.isvc_status
            status = make(v, ns or self.namespace, copies.get(v.spec.id, {}) if v.spec else {}, now, obj.get("status"),
                          serving=copies.get(kept.id, {}) if kept is not None else None)
            patch = ob.status_patch(obj.get("status"), status, ob.PREDICTOR_STATUS_FIELDS if predictor else None)
            if not patch:
                continue
            version, plural = (ob.PREDICTOR_VERSION, ob.PREDICTOR_PLURAL) if predictor else (ob.ISVC_VERSION, ob.ISVC_PLURAL)
            try:
                await asyncio.to_thread(
                    self.custom.patch_namespaced_custom_object_status,
                    ob.KSERVE_GROUP, version, ns or self.namespace, plural, name, {"status": patch},
                    _content_type="application/merge-patch+json", _request_timeout=10,
                )
                M_STATUS.labels("ok").inc()
                # Our own view, so the next pass does not patch again before the watch event lands.
                obj["status"] = {**(obj.get("status") or {}), **status}
            except ApiException as e:
                M_STATUS.labels("error").inc()
                if e.status != 404:  # deleted meanwhile: nothing to report
                    log.warning("controller: status of %s/%s not written: HTTP %s %s", ns, name, e.status, e.reason)
            except Exception as e:  # noqa: BLE001 - the next resync retries
                M_STATUS.labels("error").inc()
                log.warning("controller: status of %s/%s not written: %s", ns, name, e)


    async def _reconcile_rules(self) -> None:
        """TrafficRules: validate as `meshserve apply` does, bring Redis's rules of this namespace
        to what the cluster holds (a rule's canary status restarts only when its spec changed),
        then mirror each rule's live status (phase, canary step) into its `.status`."""
        if self.watchers[TRAFFIC].absent:
            return  # the CRD is not installed: rules are managed with `meshserve apply` alone
        objs = self.watchers[TRAFFIC].snapshot()
        raw_rules = await self.state.r.hgetall(keys.RULES)
        if not objs and not raw_rules:
            return  # the common case: no rules at all, and no need to read every model name
        known: set[str] = set()
        if objs:  # what rules may name: every alias and concrete id
            async with self.state.r.pipeline(transaction=True) as p:
                p.hkeys(keys.ALIASES).hkeys(keys.MODELS)
                raw_aliases, raw_models = await p.execute()
            known = {k.decode() for k in raw_aliases} | {k.decode() for k in raw_models}
        stored: dict[str, dict[str, Any]] = {}
        for k, v in raw_rules.items():
            try:
                stored[k.decode()] = json.loads(v)
            except ValueError:
                continue
        foreign = {d["spec"]["model"]: n for n, d in stored.items() if not kr.owned(d, self.namespace) and isinstance(d.get("spec"), dict)}
        verdicts = kr.judge(objs, known, foreign, {n for n, d in stored.items() if kr.owned(d, self.namespace)})
        want = {v.name: kr.stored_doc(v.rule, self.namespace) for v in verdicts if v.rule is not None}
        # A foreign rule of the same name is not ours to replace.
        want = {n: d for n, d in want.items() if n not in stored or kr.owned(stored[n], self.namespace)}
        changed = [d for n, d in sorted(want.items()) if stored.get(n) != d]
        gone = sorted(n for n, d in stored.items() if kr.owned(d, self.namespace) and n not in want)
        if changed or gone:
            from meshserve.rules import store as rstore

            old_status = {k.decode(): json.loads(v) for k, v in (await self.state.r.hgetall(keys.RULE_STATUS)).items()}
            ops, changes = rstore.rule_ops(changed, old_status)
            for n in gone:
                ops += store_ops.del_rule(n)
                changes.append((messages.KIND_RULE, n))
            await self.state.commit(ops, changes)
            M_RULES.labels("write").inc(len(changed))
            M_RULES.labels("remove").inc(len(gone))
            for d in changed:
                log.info("controller: trafficrule %s written (model %s)", d["metadata"]["name"], d["spec"]["model"])
            if gone:
                log.info("controller: trafficrules removed: %s", ", ".join(gone))
        for v in verdicts:
            if v.rule is None:
                log.debug("controller: trafficrule %s refused: %s", v.name, v.message)
        names = [v.name for v in verdicts]
        raws = await self.state.r.hmget(keys.RULE_STATUS, names) if names else []
        live = {n: json.loads(r) for n, r in zip(names, raws) if r}
        for v in verdicts:
            status = kr.status_of(v, live.get(v.name) if v.rule is not None and v.name in want else None)
            if v.rule is not None and v.name not in want:
                status = {**status, "phase": kr.INVALID, "message": f"a rule named {v.name!r} was applied by `meshserve apply` outside the cluster; delete it there first"}
            cur = {k: val for k, val in (v.obj.get("status") or {}).items() if k in kr.STATUS_FIELDS}
            patch = ob.merge_patch(cur, status)
            if not patch:
                continue
            ns = ob.key_of(v.obj)[0] or self.namespace
            try:
                await asyncio.to_thread(
                    self.custom.patch_namespaced_custom_object_status, kr.GROUP, kr.VERSION, ns, kr.PLURAL, v.name,
                    {"status": patch}, _content_type="application/merge-patch+json", _request_timeout=10,
                )
                M_STATUS.labels("ok").inc()
                others = {k: val for k, val in (v.obj.get("status") or {}).items() if k not in kr.STATUS_FIELDS}
                v.obj["status"] = {**others, **status}
            except Exception as e:  # noqa: BLE001 - the next resync retries
                M_STATUS.labels("error").inc()
                if not (isinstance(e, ApiException) and e.status == 404):
                    log.warning("controller: status of trafficrule %s/%s not written: %s", ns, v.name, e)


def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """In a pod, the service account; elsewhere the kubeconfig (`--kubeconfig`, $KUBECONFIG)."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
        except (config.ConfigException, FileNotFoundError, TypeError) as e:
            raise SystemExit(f"meshserve controller: no cluster credentials ({e}). Run it in a pod with a "
                             "ServiceAccount, or pass --kubeconfig / set KUBECONFIG.") from None
    return client.ApiClient()


def current_namespace(default: str = "modelmesh-serving") -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or default
    except OSError:
        return default

