"""Kind: unit. The ADS server's per-stream bookkeeping and the cache's diffing, with in-memory
requests and no network: stale nonces, ACK vs NACK, content versions, delta diffs; and what the
layouts hand the cache."""

from __future__ import annotations

import asyncio

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from meshserve_xds import matcher
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache
from meshserve_xds import delta
from meshserve_xds.delta import DeltaStream
from meshserve_xds.server import GATEWAY_GROUP, AdsServer
from meshserve_xds.sotw import SotwStream

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
    cache.set(GATEWAY_GROUP, matcher.build_all(_state(models), r.ListenerConfig()))
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
    ss = SotwStream(ads.cache)
    assert ss.on_request(discovery_pb2.DiscoveryRequest(node=NODE, type_url=r.ROUTE_TYPE, resource_names=[r.REST]))
    first = ss.due()
    assert [x.type_url for x in first] == [r.ROUTE_TYPE]
    nonce = first[0].nonce
    # A request quoting an old nonce changes nothing.
    assert not ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, response_nonce="old", error_detail=status_pb2.Status(message="x")))
    assert ss.types[r.ROUTE_TYPE].nacked_version == ""
    # A NACK of the current nonce: recorded, and the same version is not due again.
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], response_nonce=nonce, error_detail=status_pb2.Status(message="bad regex")))
    ts = ss.types[r.ROUTE_TYPE]
    assert ts.nacked_version == first[0].version_info and ts.last_error == "bad regex"
    assert ss.due() == []
    # The snapshot moves on: the new version is sent, and its ACK is recorded.
    ads.cache.set(GATEWAY_GROUP, matcher.build_all(_state({"m": ["p1"]}), r.ListenerConfig()))
    again = ss.due()
    assert len(again) == 1 and again[0].version_info != first[0].version_info
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], version_info=again[0].version_info, response_nonce=again[0].nonce))
    assert ts.acked_version == again[0].version_info


def test_delta_sends_only_what_changed_and_removals() -> None:
    ads = _server({"m": ["p0"], "n": ["p1"]})
    ss = DeltaStream(ads.cache)
    ss.on_request(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.CLUSTER_TYPE))
    first = ss.due()
    assert {x.name for x in first[0].resources} == {"pod_p0_rest", "pod_p0_grpc", "pod_p1_rest", "pod_p1_grpc", r.ACTIVATOR_REST, r.ACTIVATOR_GRPC}
    ss.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, response_nonce=first[0].nonce))
    assert ss.due() == []
    # Pod p1 leaves: only its two clusters go, as removals.
    st = _state({"m": ["p0"]})
    del st.pods["p1"]
    ads.cache.set(GATEWAY_GROUP, matcher.build_all(st, r.ListenerConfig()))
    nxt = ss.due()
    assert list(nxt[0].resources) == [] and sorted(nxt[0].removed_resources) == ["pod_p1_grpc", "pod_p1_rest"]


def test_delta_resume_sends_nothing_already_held() -> None:
    ads = _server({"m": ["p0"]})
    snap = ads.cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE]
    held = {n: snap.resource_version(n) for n in snap.resources}
    ss = DeltaStream(ads.cache)
    ss.on_request(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.ROUTE_TYPE, resource_names_subscribe=list(held), initial_resource_versions=held))
    assert ss.due() == []
    assert ss.types[r.ROUTE_TYPE].acked_version == snap.version


def test_patch_costs_the_change_and_delta_diffs_only_what_moved() -> None:
    """A patch moves the type version (content-derived, equal to a full set of the same
    content) and a stream that is up to date diffs only the touched names."""
    from envoy.config.route.v3 import route_pb2

    from meshserve_xds import cache as c

    cache = SnapshotCache()
    rcs = {f"r{i}": route_pb2.RouteConfiguration(name=f"r{i}") for i in range(100)}
    cache.set(GATEWAY_GROUP, r.Resources(by_type={r.ROUTE_TYPE: dict(rcs)}))
    snap = cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE]
    known = delta.known_versions({n: snap.resource_version(n) for n in rcs})  # as a stream keeps them
    seq = snap.seq
    changed = route_pb2.RouteConfiguration(name="r7", request_headers_to_remove=["x"])
    assert cache.patch(GATEWAY_GROUP, r.ROUTE_TYPE, {"r7": changed}, removes=["r9"])
    diff = delta.diff(cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE], known, True, set(), since_seq=seq)
    assert [u[0] for u in diff.updated] == ["r7"] and diff.removed == ["r9"]
    # Same content by a full set: same version, as another replica would compute it.
    other = SnapshotCache()
    full = {**rcs, "r7": changed}
    del full["r9"]
    other.set(GATEWAY_GROUP, r.Resources(by_type={r.ROUTE_TYPE: full}))
    assert other.group(GATEWAY_GROUP).types[r.ROUTE_TYPE].version == snap.version
    # A stream further behind than the log reaches gets a full diff, still correct.
    for i in range(c.LOG_KEEP + 5):
        cache.patch(GATEWAY_GROUP, r.ROUTE_TYPE, {"r1": route_pb2.RouteConfiguration(name="r1", request_headers_to_remove=[str(i)])})
    diff = delta.diff(cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE], known, True, set(), since_seq=seq)
    assert sorted(u[0] for u in diff.updated) == ["r1", "r7"] and diff.removed == ["r9"]


def test_sotw_routes_wait_for_clusters_and_removed_clusters_wait_for_routes() -> None:
    """Adds go first, removals last: a pod's clusters leave only after the gateway ACKed routes
    that no longer name them, and routes go only once no cluster response is in flight."""
    ads = _server({"m": ["p1"]})
    ss = SotwStream(ads.cache)
    for t, names in ((r.CLUSTER_TYPE, []), (r.ENDPOINT_TYPE, ["pod_p0_rest", "pod_p1_rest"]), (r.ROUTE_TYPE, [r.REST])):
        ss.on_request(discovery_pb2.DiscoveryRequest(node=NODE, type_url=t, resource_names=names))
    first = {x.type_url: x for x in ss.due()}
    assert r.ROUTE_TYPE not in first  # clusters and endpoints are in flight
    for t in (r.CLUSTER_TYPE, r.ENDPOINT_TYPE):
        ss.on_request(discovery_pb2.DiscoveryRequest(type_url=t, version_info=first[t].version_info, response_nonce=first[t].nonce,
                                                           resource_names=ss.types[t].names))
    routes = ss.due()
    assert [x.type_url for x in routes] == [r.ROUTE_TYPE]
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, version_info=routes[0].version_info, response_nonce=routes[0].nonce, resource_names=[r.REST]))

    # Pod p1 goes away and m moves to p0.
    st = _state({"m": ["p0"]})
    del st.pods["p1"]
    ads.cache.set(GATEWAY_GROUP, matcher.build_all(st, r.ListenerConfig()))
    cds = [x for x in ss.due() if x.type_url == r.CLUSTER_TYPE][0]
    assert cds.version_info.endswith("+keep")
    assert "pod_p1_rest" in {cluster_pb2.Cluster.FromString(c.value).name for c in cds.resources}
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, version_info=cds.version_info, response_nonce=cds.nonce))
    eds = ss.types[r.ENDPOINT_TYPE]
    if eds.pending:
        ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, version_info=eds.sent_version, response_nonce=eds.nonce, resource_names=eds.names))
    route = [x for x in ss.due() if x.type_url == r.ROUTE_TYPE][0]
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, version_info=route.version_info, response_nonce=route.nonce, resource_names=[r.REST]))
    final = [x for x in ss.due() if x.type_url == r.CLUSTER_TYPE][0]
    assert not final.version_info.endswith("+keep") and len(final.resources) == 4


def test_scoped_layout_changes_reach_the_cache_as_patches() -> None:
    """The scoped layout, after its full build, hands the cache patches: a pod that goes takes
    its clusters and endpoints with it, a moved model changes its RouteConfiguration and
    nothing else, and listeners (built once) never move."""
    from meshserve_xds.scoped import ScopedLayout

    cache = SnapshotCache()
    layout = ScopedLayout(r.ListenerConfig(), GATEWAY_GROUP)
    cache.set(GATEWAY_GROUP, layout.build_full(_state({"m": ["p0"]})))
    before = {t: s.version for t, s in cache.group(GATEWAY_GROUP).types.items()}
    st = _state({"m": ["p0"]})
    del st.pods["p1"]
    moved = cache.apply_many({GATEWAY_GROUP: layout.apply_change(st)})[GATEWAY_GROUP]
    assert moved == [r.CLUSTER_TYPE, r.ENDPOINT_TYPE]
    assert not [n for n in cache.group(GATEWAY_GROUP).types[r.CLUSTER_TYPE].resources if "p1" in n]
    st.loaded = {"m": ["p0"]}
    st.pods["p1"] = r.Endpoint("127.0.0.1", 3, 4)
    cache.apply_many({GATEWAY_GROUP: layout.apply_change(st)})
    st2 = _state({"m": ["p1"]})
    moved = cache.apply_many({GATEWAY_GROUP: layout.apply_change(st2)})[GATEWAY_GROUP]
    assert moved == [r.ROUTE_TYPE]
    after = {t: s.version for t, s in cache.group(GATEWAY_GROUP).types.items()}
    assert after[r.LISTENER_TYPE] == before[r.LISTENER_TYPE] and after[r.CLUSTER_TYPE] == before[r.CLUSTER_TYPE]


def test_an_istio_gateway_gets_the_matcher_gateways_routes_without_listeners() -> None:
    """With the matcher layout, the Istio group's routes and clusters are the gateway's own
    build (made and serialized once), without our listeners: istiod owns the listener."""
    from meshserve_xds.layout import extra_layout, gateway_layout
    from meshserve_xds.server import ISTIO_GROUP

    gw = gateway_layout("matcher", r.ListenerConfig())
    istio = extra_layout(ISTIO_GROUP, gw)
    st = _state({"m": ["p0"]})
    g, i = gw.build_full(st), istio.build_full(st)
    assert set(g.by_type[r.LISTENER_TYPE]) == {r.REST, r.GRPC} and i.by_type[r.LISTENER_TYPE] == {}
    assert i.by_type[r.ROUTE_TYPE] is g.by_type[r.ROUTE_TYPE] and i.by_type[r.CLUSTER_TYPE] is g.by_type[r.CLUSTER_TYPE]
    # With the scoped gateway layout the Istio group builds its own matcher routes.
    alone = extra_layout(ISTIO_GROUP, gateway_layout("scoped", r.ListenerConfig())).build_full(st)
    assert set(alone.by_type[r.ROUTE_TYPE]) == {r.REST, r.GRPC} and alone.by_type[r.LISTENER_TYPE] == {}


def test_a_gateway_is_synced_at_the_revision_only_once_it_acked_the_current_snapshot() -> None:
    """Issue 19: what the xDS server publishes for the loaders' unloads (synced.py). A gateway
    is at the source's revision once it ACKed every type it subscribes to; while a newer
    snapshot is unsent or unACKed it stays at the revision it had, and a NACK keeps it there."""
    from meshserve_xds.synced import synced_revs

    ads = _server({"m": ["p0"]})
    ss = SotwStream(ads.cache)
    streams = {"s1": ss}
    assert synced_revs(streams, 5, {}) == {}  # has not said who it is yet
    ss.on_request(discovery_pb2.DiscoveryRequest(node=NODE, type_url=r.ROUTE_TYPE, resource_names=[r.REST]))
    sent = ss.due()
    assert synced_revs(streams, 5, {}) == {"gw/s1": 0}  # known, and behind: its answer is pending
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], version_info=sent[0].version_info, response_nonce=sent[0].nonce))
    assert synced_revs(streams, 5, {}) == {"gw/s1": 5}
    # Revision 6 withdraws the copy: not synced at 6 until the new routes are ACKed.
    ads.cache.set(GATEWAY_GROUP, matcher.build_all(_state({"m": ["p1"]}), r.ListenerConfig()))
    before = {"gw/s1": 5}
    assert synced_revs(streams, 6, before) == {"gw/s1": 5}
    again = ss.due()
    assert synced_revs(streams, 6, before) == {"gw/s1": 5}
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], response_nonce=again[0].nonce, error_detail=status_pb2.Status(message="bad")))
    assert synced_revs(streams, 6, before) == {"gw/s1": 5}  # rejected: it still routes by the old ones
    # A revision that changes nothing for the group: an up-to-date gateway is at it at once.
    ads.cache.set(GATEWAY_GROUP, matcher.build_all(_state({"m": ["p0", "p1"]}), r.ListenerConfig()))
    third = ss.due()
    ss.on_request(discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[r.REST], version_info=third[0].version_info, response_nonce=third[0].nonce))
    assert synced_revs(streams, 7, before) == {"gw/s1": 7}
    assert synced_revs(streams, 8, {"gw/s1": 7}) == {"gw/s1": 8}


def test_delta_sends_many_route_configurations_in_batches_one_per_ack(monkeypatch) -> None:
    """A gateway subscribing to more RouteConfigurations than a batch holds gets them a batch
    per ACK, is not in sync (nor synced, for the loaders) before the last, and is after."""
    from meshserve_xds import scoped

    monkeypatch.setattr(delta, "MAX_RESOURCES", 3)
    st = _state({f"m{i}": ["p0"] for i in range(7)})
    st.registered = set(st.loaded)
    cache = SnapshotCache()
    cache.set(GATEWAY_GROUP, scoped.build_all(st, r.ListenerConfig()))
    snap = cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE]
    names = sorted(snap.resources)  # 7 models and the activator's
    ss = DeltaStream(cache)
    ss.on_request(discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=r.ROUTE_TYPE, resource_names_subscribe=names))
    got: list[str] = []
    for expect in (3, 3, 2):
        out = ss.due()
        assert len(out) == 1 and len(out[0].resources) == expect
        assert ss.due() == []  # nothing more until this batch is ACKed
        got += [x.name for x in out[0].resources]
        last = out[0].system_version_info
        if len(got) < len(names):
            assert last == snap.version + delta.PARTIAL_SUFFIX  # not in sync yet
        ss.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=r.ROUTE_TYPE, response_nonce=out[0].nonce))
    assert sorted(got) == names
    assert last == snap.version and ss.types[r.ROUTE_TYPE].acked_version == snap.version
    assert ss.due() == []
