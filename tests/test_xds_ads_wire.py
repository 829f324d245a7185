"""Kind: integration (gRPC on loopback, no Envoy). The ADS server sends the bytes its streams
wrote (`AdsServer.add_to`, stream.WireResponse): a client gets the response the generated
registration would have sent, for delta and state-of-the-world, ACKs and all."""

from __future__ import annotations

import asyncio

import grpc

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from meshserve_xds import matcher
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import GATEWAY_GROUP, AdsServer

NODE = base_pb2.Node(id="gw", cluster=GATEWAY_GROUP)
STATE = r.RoutingState(
    pods={"p0": r.Endpoint("127.0.0.1", 1, 2), "p1": r.Endpoint("127.0.0.1", 3, 4)},
    loaded={"m": ["p0"], "n": ["p0", "p1"]}, aliases={}, activator=r.Endpoint("127.0.0.1", 5, 6),
)


async def _exchange(raw: bool) -> tuple[list[object], list[object]]:
    cache = SnapshotCache()
    cache.set(GATEWAY_GROUP, matcher.build_all(STATE, r.ListenerConfig()))
    ads = AdsServer(cache)
    server = grpc.aio.server()
    if raw:
        ads.add_to(server)
    else:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
            delta_q: asyncio.Queue = asyncio.Queue()
            await delta_q.put(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.CLUSTER_TYPE))
            delta_call = stub.DeltaAggregatedResources(iter_queue(delta_q))
            d1 = await asyncio.wait_for(delta_call.read(), 10)
            await delta_q.put(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.CLUSTER_TYPE, response_nonce=d1.nonce))
            sotw_q: asyncio.Queue = asyncio.Queue()
            await sotw_q.put(discovery_pb2.DiscoveryRequest(node=NODE, type_url=r.CLUSTER_TYPE))
            sotw_call = stub.StreamAggregatedResources(iter_queue(sotw_q))
            s1 = await asyncio.wait_for(sotw_call.read(), 10)
            await delta_q.put(None)
            await sotw_q.put(None)
            delta_call.cancel()
            sotw_call.cancel()
            return [d1], [s1]
    finally:
        await server.stop(None)


async def iter_queue(q: asyncio.Queue):  # type: ignore[no-untyped-def]
    while (item := await q.get()) is not None:
        yield item


def _strip(msg: object) -> object:
    msg.nonce = ""  # type: ignore[attr-defined]  # random per response
    return msg


def test_bytes_sent_as_written_are_the_response_the_generated_registration_sends() -> None:
    raw_d, raw_s = asyncio.run(_exchange(True))
    msg_d, msg_s = asyncio.run(_exchange(False))
    assert raw_d[0].type_url == r.CLUSTER_TYPE and len(raw_d[0].resources) == 8  # 2 pods x 2, a copy set x 2, the activator's 2
    assert {x.name for x in raw_d[0].resources} == {x.name for x in msg_d[0].resources}
    assert _strip(raw_d[0]) == _strip(msg_d[0])
    assert _strip(raw_s[0]) == _strip(msg_s[0]) and len(raw_s[0].resources) == 8
