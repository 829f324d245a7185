"""Issue 3, item 3: ordering and warming. Under continuous load, while models load, unload and
move between pods that come and go, no request gets a 503 because of update order.

Kind: e2e. A real Envoy configured by our in-process ADS server (matcher layout over SotW and
delta, scoped layout over delta); three
stand-in pods and a stand-in activator (tiny HTTP servers); a client thread sending requests
back to back for the whole test (bounded: 20 state changes).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter

import pytest

from meshserve_xds import resources as r
from meshserve_xds import matcher, scoped
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy, http as get, wait_for
from meshserve_xds.server import GATEWAY_GROUP

pytestmark = pytest.mark.e2e

M0 = "m0__isvc-0000000000"
M1 = "m1__isvc-1111111111"


class Load(threading.Thread):
    def __init__(self, port: int, names: list[str]):
        super().__init__(daemon=True)
        self.port, self.names = port, names
        self.codes: Counter[int] = Counter()
        self.bad: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        i = 0
        while not self.stop.is_set():
            name = self.names[i % len(self.names)]
            i += 1
            try:
                conn.request("GET", f"/v2/models/{name}/infer")
                resp = conn.getresponse()
                body = resp.read()
                self.codes[resp.status] += 1
                if resp.status != 200:
                    self.bad.append(f"{name}: {resp.status} {body[:200]!r}")
            except OSError as e:
                self.bad.append(f"{name}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)


@pytest.mark.parametrize("layout,delta", [("matcher", False), ("matcher", True), ("scoped", True)], ids=["sotw", "delta", "scoped-delta"])
def test_no_503_while_models_move_and_pods_come_and_go(layout: str, delta: bool) -> None:
    ups = [Upstream(f"pod-{i}") for i in range(3)]
    act = Upstream("activator")
    for u in [*ups, act]:
        u.__enter__()
    ads = AdsThread().start()
    try:
        eps = {u.name: r.Endpoint("127.0.0.1", u.port, u.port) for u in ups}
        admin = 0  # Envoy binds any free admin port; the harness reads it back
        listeners = r.ListenerConfig("127.0.0.1", 0, 0)  # and free listener ports, read back from its admin API

        def publish(pods: list[str], loaded: dict[str, list[str]]) -> None:
            state = r.RoutingState(pods={p: eps[p] for p in pods}, loaded=loaded, aliases={"m0": M0, "m1": M1},
                                   activator=r.Endpoint("127.0.0.1", act.port, act.port), registered={M0, M1})
            ads.set(GATEWAY_GROUP, (scoped.build_all if layout == "scoped" else matcher.build_all)(state, listeners))

        publish(["pod-0"], {M0: ["pod-0"]})
        with envoy(gateway_bootstrap("gw-order", "127.0.0.1", ads.port, admin, delta=delta), admin) as gw:
            rest = gw.listener_port(r.REST)
            wait_for(lambda: get(f"http://127.0.0.1:{rest}/v2/models/m0/infer")[1].get("upstream") == "pod-0", 20, "m0 routed")
            load = Load(rest, ["m0", "m1", M0])
            load.start()
            try:
                # Each step moves the models onto a pod that is new in this snapshot and drops
                # the pod they were on: the route must never name a cluster Envoy lacks.
                for step in range(20):
                    new, old = f"pod-{(step + 1) % 3}", f"pod-{step % 3}"
                    loaded = {M0: [new]} if step % 2 else {M0: [new], M1: [new]}
                    publish([new], loaded)
                    wait_for(lambda: get(f"http://127.0.0.1:{rest}/v2/models/m0/infer")[1].get("upstream") == new, 10, f"step {step}")
                    time.sleep(0.05)
                    del old
            finally:
                load.stop.set()
                load.join(10)
            assert sum(load.codes.values()) > 100, load.codes
            assert load.codes.get(503, 0) == 0 and not load.bad, (load.codes, load.bad[:5])
    finally:
        ads.stop()
        for u in [*ups, act]:
            u.__exit__()
