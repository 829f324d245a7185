"""Issue 3: Istio/ASM mode. The gateway's listener comes from elsewhere (istiod, in production);
our server feeds only the route configuration it names, and the clusters and endpoints those
routes use.

Kind: e2e. A real Envoy whose bootstrap has a static listener on a test port taking RDS
`meshserve_rest` over ADS from our in-process server, node.cluster `meshserve-istio`; two tiny
HTTP servers stand in for a pod and the activator.
"""

from __future__ import annotations

import pytest

from meshserve_xds import matcher
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import istio_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy, http, wait_for
from meshserve_xds.server import ISTIO_GROUP

pytestmark = pytest.mark.e2e

M0 = "m0__isvc-0000000000"


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_static_listener_takes_our_routes_and_no_listeners(delta: bool) -> None:
    with Upstream("pod-0") as pod, Upstream("activator") as act:
        ads = AdsThread().start()
        try:
            state = r.RoutingState(
                pods={"pod-0": r.Endpoint("127.0.0.1", pod.port, pod.port)},
                loaded={M0: ["pod-0"]},
                aliases={"m0": M0},
                activator=r.Endpoint("127.0.0.1", act.port, act.port),
            )
            ads.set(ISTIO_GROUP, matcher.build_all(state, None))
            admin = 0  # Envoy binds free admin and listener ports; the harness reads them back
            with envoy(istio_bootstrap("istio-ingressgateway-0", "127.0.0.1", ads.port, admin, 0, delta=delta), admin) as gw:
                base = f"http://127.0.0.1:{gw.listener_port('istio_ingress_8008')}"
                wait_for(lambda: http(f"{base}/v2/models/m0/infer", data=b"{}")[1].get("upstream") == "pod-0", 20, "m0 via the static listener")
                code, body = http(f"{base}/v2/models/cold/infer", data=b"{}")
                assert body.get("upstream") == "activator"
                # The listener is the static one; we sent none.
                assert gw.config_dump("dynamic_listeners") == []
                assert [c["listener"]["name"] for c in gw.config_dump("static_listeners")] == ["istio_ingress_8008"]
                # Only what that listener refers to: its route configuration, our clusters.
                assert set(gw.route_versions()) == {r.REST}
                clusters = {c["cluster"]["name"] for c in gw.config_dump("dynamic_active_clusters")}
                assert clusters == {"pod_pod-0_rest", "pod_pod-0_grpc", r.ACTIVATOR_REST, r.ACTIVATOR_GRPC}
                streams = ads.run(ads.ads.debug)  # type: ignore[union-attr]
                assert streams[0]["group"] == ISTIO_GROUP and "Listener" not in streams[0]["types"]
        finally:
            ads.stop()
