"""The ADS server, state-of-the-world and incremental (delta), kept thin: it only runs streams.

Per stream it keeps a `SotwStream` (sotw.py) or a `DeltaStream` (delta.py), which track per
type what was sent (version, nonce) and what Envoy acknowledged. A request whose nonce is not
the latest one sent is stale and ignored. A request carrying `error_detail` is a NACK: logged
with Envoy's reason, counted, and the rejected version is not sent again; the gateway keeps
its last good config until the snapshot moves on. The snapshots come from the cache
(cache.py), which the source fills; the server never builds anything.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator

import grpc
from prometheus_client import Gauge

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.delta import DeltaStream
from meshserve_xds.resources import GATEWAY_GROUP, GROUPS, ISTIO_GROUP, PROXYLESS_GROUP
from meshserve_xds.sotw import SotwStream
from meshserve_xds.stream import Stream, group_of

log = logging.getLogger("meshserve.xds")

# Re-exported: where the bootstrap and the tests have always found the group names.
__all__ = ["AdsServer", "GATEWAY_GROUP", "GROUPS", "ISTIO_GROUP", "PROXYLESS_GROUP", "group_of"]

M_CONNECTED = Gauge("meshserve_xds_connected_gateways", "Gateways with an open ADS stream")


ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _serialize(resp: object) -> bytes:
    """A response's bytes: a WireResponse's own, or a message serialized."""
    return resp.SerializeToString()  # type: ignore[attr-defined]


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self.streams: dict[str, Stream] = {}
        # Responses go out as the bytes the streams wrote (`add_to`); registered by the
        # generated `add_AggregatedDiscoveryServiceServicer_to_server`, whose serializers
        # take messages only, they are parsed first.
        self.raw = False

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve ADS on `server`, as the generated registration does, with a response
        serializer that takes the streams' bytes as they are (stream.WireResponse)."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources, request_deserializer=discovery_pb2.DiscoveryRequest.FromString, response_serializer=_serialize),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
        if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63, as the generated code
            server.add_registered_method_handlers(ADS_SERVICE, handlers)
        self.raw = True

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for resp in self._serve(SotwStream(self.cache), request_iterator):
            yield resp

    async def DeltaAggregatedResources(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        async for resp in self._serve(DeltaStream(self.cache), request_iterator):
            yield resp

    async def _serve(self, ss: SotwStream | DeltaStream, requests: AsyncIterator) -> AsyncIterator:  # type: ignore[type-arg]
        """One ADS stream: a reader applies requests to `ss`, a pusher sends what is due when
        the group's snapshot moves or a request asks for something new."""
        sid = uuid.uuid4().hex[:8]
        self.streams[sid] = ss
        M_CONNECTED.inc()
        out: asyncio.Queue[object | None] = asyncio.Queue()
        wake = asyncio.Event()

        async def reader() -> None:
            try:
                async for req in requests:
                    if ss.on_request(req):
                        wake.set()
            finally:
                await out.put(None)

        async def pusher() -> None:
            while not ss.group:
                await wake.wait()
                wake.clear()
            g = self.cache.group(ss.group)
            while True:
                changed = g.changed
                for resp in ss.due():
                    await out.put(resp if self.raw else resp.message())
                waiter = asyncio.ensure_future(changed.wait())
                wake_task = asyncio.ensure_future(wake.wait())
                await asyncio.wait({waiter, wake_task}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                wake_task.cancel()
                wake.clear()

        tasks = [asyncio.create_task(reader()), asyncio.create_task(pusher())]
        try:
            while True:
                resp = await out.get()
                if resp is None:
                    return
                yield resp
        finally:
            for t in tasks:
                t.cancel()
            self.streams.pop(sid, None)
            M_CONNECTED.dec()
            ss.forget_metrics()
            log.info("gateway %s disconnected", ss.node_id)

    def debug(self) -> list[dict[str, object]]:
        return [{"stream": sid, **ss.debug()} for sid, ss in self.streams.items()]
