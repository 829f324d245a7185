"""Kind: unit. The ADS server's per-stream bookkeeping and the cache's diffing, with in-memory
requests and no network: stale nonces, ACK vs NACK, content versions, delta diffs."""

from __future__ import annotations

import asyncio

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds.server import GATEWAY_GROUP, AdsServer, StreamState

NODE = base_pb2.Node(id="gw", cluster=GATEWAY_GROUP)


def _state(models: dict[str, list[str]]) -> r.RoutingState:
    return r.RoutingState(
        pods={"p0": r.Endpoint("127.0.0.1", 1, 2), "p1": r.Endpoint("127.0.0.1", 3, 4)},
        loaded=models,
        aliases={},
        activator=r.Endpoint("127.0.0.1", 5, 6),
    )


def _server(models: dict[str, list[str]]) -> AdsServer:
    cache = SnapshotCache()
    asyncio.run(cache.set(GATEWAY_GROUP, r.build_all(_state(models), r.ListenerConfig())))
    return AdsServer(cache)


def test_versions_come_from_content_so_replicas_agree() -> None:
    a, b = _server({"m": ["p0"]}), _server({"m": ["p0"]})
    va = {t: s.version for t, s in a.cache.group(GATEWAY_GROUP).types.items()}
    vb = {t: s.version for t, s in b.cache.group(GATEWAY_GROUP).types.items()}
    assert va == vb
    c = _server({"m": ["p1"]})
    vc = {t: s.version for t, s in c.cache.group(GATEWAY_GROUP).types.items()}
    assert vc[r.ROUTE_TYPE] != va[r.ROUTE_TYPE] and vc[r.CLUSTER_TYPE] == va[r.CLUSTER_TYPE]


def test_sotw_stale_nonce_ignored_and_nack_not_resent() -> None:
    ads = _server({"m": ["p0"]})
    ss = StreamState()
    assert ads._on_request(ss, discovery_pb2.DiscoveryRequest(node=NODE, type_url=r.ROUTE_TYPE, resource_names=[r.REST]))
    first = ads._due(ss)
    assert [x.type_url for x in first] == [r.ROUTE_TYPE]
    nonce = first[0].nonce
    # A request quoting an old nonce changes nothing.
    assert not ads._on_request(ss, discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, response_nonce="old", error_detail=status_pb2.Status(message="x")))
    assert ss.types[r.ROUTE_TYPE].nacked_version == ""
    # A NACK of the current nonce: recorded, and the same version is not due again.
    ads._on_request(ss, discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], response_nonce=nonce, error_detail=status_pb2.Status(message="bad regex")))
    ts = ss.types[r.ROUTE_TYPE]
    assert ts.nacked_version == first[0].version_info and ts.last_error == "bad regex"
    assert ads._due(ss) == []
    # The snapshot moves on: the new version is sent, and its ACK is recorded.
    asyncio.run(ads.cache.set(GATEWAY_GROUP, r.build_all(_state({"m": ["p1"]}), r.ListenerConfig())))
    again = ads._due(ss)
    assert len(again) == 1 and again[0].version_info != first[0].version_info
    ads._on_request(ss, discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], version_info=again[0].version_info, response_nonce=again[0].nonce))
    assert ts.acked_version == again[0].version_info


def test_delta_sends_only_what_changed_and_removals() -> None:
    ads = _server({"m": ["p0"], "n": ["p1"]})
    ss = StreamState(delta=True)
    ads._on_delta_request(ss, discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.CLUSTER_TYPE))
    first = ads._delta_due(ss)
    assert {x.name for x in first[0].resources} == {"pod_p0_rest", "pod_p0_grpc", "pod_p1_rest", "pod_p1_grpc", r.ACTIVATOR_REST, r.ACTIVATOR_GRPC}
    ads._on_delta_request(ss, discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, response_nonce=first[0].nonce))
    assert ads._delta_due(ss) == []
    # Pod p1 leaves: only its two clusters go, as removals.
    st = _state({"m": ["p0"]})
    del st.pods["p1"]
    asyncio.run(ads.cache.set(GATEWAY_GROUP, r.build_all(st, r.ListenerConfig())))
    nxt = ads._delta_due(ss)
    assert list(nxt[0].resources) == [] and sorted(nxt[0].removed_resources) == ["pod_p1_grpc", "pod_p1_rest"]


def test_delta_resume_sends_nothing_already_held() -> None:
    ads = _server({"m": ["p0"]})
    snap = ads.cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE]
    held = {n: snap.resource_version(n) for n in snap.resources}
    ss = StreamState(delta=True)
    ads._on_delta_request(ss, discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.ROUTE_TYPE, resource_names_subscribe=list(held), initial_resource_versions=held))
    assert ads._delta_due(ss) == []
    assert ss.types[r.ROUTE_TYPE].acked_version == snap.version
