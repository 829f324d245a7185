"""Pod liveness: stale heartbeats are probed, gone pods withdrawn with their copies, and
requests held for a pool without pods placed once one registers."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from meshserve.model import CopyState
from meshserve.store import keys as k
from meshserve.store import ops as cmd
from meshserve.store.messages import KIND_PAUSED, KIND_POD
from meshserve_placement import reducers
from meshserve_placement.liveness import ANSWERED, Liveness, Probe, judge
from meshserve_placement.types import Changes, Ops

log = logging.getLogger("meshserve.placement")


class Pods:
    async def _expire_pods(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            await self._expire_pods_with(http)

    async def _expire_pods_with(self, http: aiohttp.ClientSession) -> None:
        period = self.s.heartbeat_seconds
        while True:
            await asyncio.sleep(period / 2)
            hb = await self.state.r.zrange(k.HEARTBEATS, 0, -1, withscores=True)
            self.heartbeats = {p.decode(): v for p, v in hb}
            now = time.time()
            stale = [p for p in self.view.pods if now - self.heartbeats.get(p, 0) > period * self.s.heartbeat_misses]
            # Probed outside the lock: a probe waits up to half a period, decisions must not.
            answers = dict(zip(stale, await asyncio.gather(*(self._probe(http, p) for p in stale)))) if stale else {}
            async with self._deciding():
                await self._refresh_pods()
                now = time.time()
                paused: dict[str, str] = {}
                for pod in list(self.view.pods):
                    if pod not in answers:
                        if self.stalled.pop(pod, None) is not None:
                            log.info("pod %s: its loader is back", pod)
                        continue
                    v = judge(now, self.heartbeats.get(pod, 0), period, self.s.heartbeat_misses, answers[pod],
                              self.s.loader_stall_grace_seconds, self.s.paused_pod_grace_seconds)
                    if v.liveness == Liveness.GONE:
                        self.stalled.pop(pod, None)
                        await self._withdraw_pod(pod, v.reason)
                        continue
                    if v.liveness == Liveness.STALLED and pod not in self.stalled:
                        log.warning("pod %s: %s", pod, v.reason)
                        self.stalled[pod] = v.reason
                    if v.paused:
                        paused[pod] = v.reason  # a pod marked already keeps its first reason (_mark_paused)
                await self._mark_paused(paused)
                await self._place_pending()

    async def _mark_paused(self, paused: dict[str, str]) -> None:
        """Commit which pods are paused (keys.PAUSED) where it changed: the gateways then send
        their copies' traffic to the pods that answer (xds clusters.build_copy_set)."""
        if self.paused is None:
            self.paused = await cmd.read_paused(self.state.r)
        came = {p: why for p, why in paused.items() if p not in self.paused}
        went = [p for p in self.paused if p not in paused]
        if not came and not went:
            self._view_paused()  # the view may have been rebuilt meanwhile
            return
        ops: Ops = [cmd.set_paused(p, why) for p, why in came.items()]
        if went:
            ops.append(cmd.clear_paused(went))
        await self._commit(ops, [(KIND_PAUSED, p) for p in [*came, *went]])
        for p in went:
            log.info("pod %s answers again: its copies take traffic again", p)
            del self.paused[p]
        for p, why in came.items():
            log.warning("pod %s paused: its copies' traffic goes to other copies while it is (%s)", p, why)
            self.paused[p] = why
        self._view_paused()

    def _view_paused(self) -> None:
        """The view's pods marked as committed (copies.plan_copies covers their models)."""
        marked = self.paused or {}
        for p, pv in self.view.pods.items():
            pv.paused = p in marked

    async def _probe(self, http: aiohttp.ClientSession, pod_id: str) -> Probe:
        pod = self.pods.get(pod_id)
        if pod is None:
            return Probe("not registered")
        return await probe_runtime(http, pod.host, pod.rest_port, pod.grpc_port, max(0.2, self.s.heartbeat_seconds / 2))

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
        ops: Ops = cmd.withdraw_pod(pod, record)
        changes: Changes = [(KIND_POD, pod)]
        for m in list(self.view.pod_models(pod)):
            self._set_copies(m, reducers.without_pod(self.view.copies[m], pod), ops, changes)
        if self.paused and pod in self.paused:
            changes.append((KIND_PAUSED, pod))  # withdraw_pod dropped it from keys.PAUSED
        await self._commit(ops, changes)
        if self.paused:
            self.paused.pop(pod, None)
        self.view.pods.pop(pod, None)
        self.pods.pop(pod, None)
        self.heartbeats.pop(pod, None)
        requeue = [m for m in self.queues.pop(pod, {}) if m in self.waiting]
        self._traces = {key: v for key, v in self._traces.items() if key[0] != pod}
        self._failed_unloads = {key: v for key, v in self._failed_unloads.items() if key[1] != pod}
        for m in requeue + [m for m in self.waiting if not self.view.copies.get(m)]:
            spec = self.specs.get(m)
            if spec is not None and not any(c.state in (CopyState.LOADED, CopyState.LOADING) for c in self.view.copies.get(m, {}).values()):
                await self._place(spec, waiting=True, why=f"pod {pod} died before loading it")


async def probe_runtime(http: aiohttp.ClientSession, host: str, rest_port: int | None, grpc_port: int, timeout: float) -> Probe:
    """REST readiness where the runtime serves REST, else its gRPC port's first HTTP/2 frame. `http`
    must open a new connection per request (`force_close`): a pooled one would hide whether the
    port still accepts connections, which is what tells a paused pod from an unreachable one."""
    try:
        if rest_port:
            limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
            async with http.get(f"http://{host}:{rest_port}/v2/health/ready", timeout=limits) as r:
                return ANSWERED if r.status == 200 else Probe(f"readiness answered HTTP {r.status}")
        return await _http2_answers(host, grpc_port, timeout)
    except aiohttp.SocketTimeoutError:
        return Probe(f"connection accepted, no answer within {timeout:g}s", accepted=True)
    except asyncio.TimeoutError:  # aiohttp's connect timeout is one too
        return Probe(f"no connection within {timeout:g}s")
    except (aiohttp.ClientError, OSError) as e:
        return Probe(str(e) or type(e).__name__)


# The client's connection preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5): any HTTP/2
# server, so any gRPC server, answers with a SETTINGS frame of its own before anything else.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def _http2_answers(host: str, port: int, timeout: float) -> Probe:
    """A runtime that serves gRPC only: a TCP connect alone passes for a paused process too, so
    wait for the server's first frame. No gRPC call: the runtime need implement no health
    service."""
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        w.write(_H2_PREFACE)
        try:
            await asyncio.wait_for(r.read(9), timeout)
        except asyncio.TimeoutError:
            return Probe(f"connection accepted, no HTTP/2 frame within {timeout:g}s", accepted=True)
        except OSError:
            pass  # reset: a process that is running did it (a TLS port may answer so)
        return ANSWERED  # a frame, or a close: either way the process runs
    finally:
        w.close()
