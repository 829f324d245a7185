"""Pod liveness: stale heartbeats are probed, gone pods withdrawn with their copies, and
requests held for a pool without pods placed once one registers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from opentelemetry import trace
from prometheus_client import Histogram

from meshserve import state as st
from meshserve import tracing
from meshserve.model import Copy, CopyState, ModelSpec, Pod, copies_to_json
from meshserve_placement import copies as copyplan
from meshserve_placement import keys, policy
from meshserve_placement.sizes import booked_size, reported_of
from meshserve_placement.liveness import Liveness, judge
from meshserve_placement.types import Changes, Ops

log = logging.getLogger("meshserve.placement")


class Pods:
    async def _expire_pods(self, http: aiohttp.ClientSession) -> None:
        period = self.s.heartbeat_seconds
        while True:
            await asyncio.sleep(period / 2)
            hb = await self.state.r.zrange(st.HEARTBEATS, 0, -1, withscores=True)
            self.heartbeats = {k.decode(): v for k, v in hb}
            now = time.time()
            stale = [p for p in self.view.pods if now - self.heartbeats.get(p, 0) > period * self.s.heartbeat_misses]
            # Probed outside the lock: a probe waits up to half a period, decisions must not.
            answers = dict(zip(stale, await asyncio.gather(*(self._probe(http, p) for p in stale)))) if stale else {}
            async with self._lock:
                await self._refresh_pods()
                now = time.time()
                for pod in list(self.view.pods):
                    if pod not in answers:
                        if self.stalled.pop(pod, None) is not None:
                            log.info("pod %s: its loader is back", pod)
                        continue
                    v = judge(now, self.heartbeats.get(pod, 0), period, self.s.heartbeat_misses, answers[pod], self.s.loader_stall_grace_seconds)
                    if v.liveness == Liveness.GONE:
                        self.stalled.pop(pod, None)
                        await self._withdraw_pod(pod, v.reason)
                    elif v.liveness == Liveness.STALLED and pod not in self.stalled:
                        log.warning("pod %s: %s", pod, v.reason)
                        self.stalled[pod] = v.reason
                await self._place_pending()

    async def _probe(self, http: aiohttp.ClientSession, pod_id: str) -> str | None:
        """None when the pod's runtime answers (its data plane is up), else why not. REST
        readiness where the runtime serves REST, else a TCP connect to its gRPC port."""
        pod = self.pods.get(pod_id)
        if pod is None:
            return "not registered"
        timeout = max(0.2, self.s.heartbeat_seconds / 2)
        try:
            if pod.rest_port:
                async with http.get(f"http://{pod.host}:{pod.rest_port}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    return None if r.status == 200 else f"readiness answered HTTP {r.status}"
            _, w = await asyncio.wait_for(asyncio.open_connection(pod.host, pod.grpc_port), timeout)
            w.close()
            return None
        except asyncio.TimeoutError:
            return f"no answer within {timeout:g}s"
        except (aiohttp.ClientError, OSError) as e:
            return str(e) or type(e).__name__

    async def _place_pending(self) -> None:
        """Requests held for a pool with no pods: place them once one of its pods is up."""
        for model, runtime in list(self.pending.items()):
            if not self.view.pool(runtime) and runtime in self.view.runtimes:
                continue
            del self.pending[model]
            spec = self.specs.get(model)
            placed = any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in self.view.copies.get(model, {}).values())
            if spec is not None and model in self.waiting and not placed:
                await self._place(spec, waiting=True, why=f"ServingRuntime {runtime} has a pod now")

    async def _withdraw_pod(self, pod: str, reason: str) -> None:
        log.warning("withdrawing pod %s and its placements: %s", pod, reason)
        record = {"last_heartbeat": self.heartbeats.get(pod, 0.0), "withdrawn_at": time.time(), "reason": reason}
        ops: Ops = [
            ["HDEL", st.PODS, pod], ["ZREM", st.HEARTBEATS, pod], ["DEL", keys.loadq_key(pod)],
            ["HSET", st.WITHDRAWN, pod, json.dumps(record, separators=(",", ":"))],
        ]
        changes: Changes = [(st.KIND_POD, pod)]
        for m in list(self.view.pod_models(pod)):
            rest = {p: c for p, c in self.view.copies[m].items() if p != pod}
            self._set_copies(m, rest, ops, changes)
        self.view.pods.pop(pod, None)
        self.pods.pop(pod, None)
        requeue = [m for m in self.queues.pop(pod, {}) if m in self.waiting]
        self._traces = {k: v for k, v in self._traces.items() if k[0] != pod}
        await self._commit(ops, changes)
        for m in requeue + [m for m in self.waiting if not self.view.copies.get(m)]:
            spec = self.specs.get(m)
            if spec is not None and not any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in self.view.copies.get(m, {}).values()):
                await self._place(spec, waiting=True, why=f"pod {pod} died before loading it")
