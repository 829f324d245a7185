"""A model's copies share one cluster (matcher layout): a retry reaches another copy when a pod
dies, and copy sets coming and going under load cost no request (issue 9, fault case 3).

Kind: e2e. A real Envoy configured by our in-process ADS server (matcher layout, SotW and
delta); stand-in pods (tiny HTTP servers) and a "dead" pod whose port nobody listens on; a
client sending requests back to back (bounded in count).
"""

from __future__ import annotations

import http.client
import json
import re
from collections import Counter

import pytest

from meshserve_testing.devmesh import free_port
from meshserve_xds import clusters, matcher
from meshserve_xds import resources as r
from meshserve_xds.bootstrap import gateway_bootstrap
from meshserve_testing.xds_harness import AdsThread, Upstream, envoy, http as get, wait_for
from meshserve_xds.server import GATEWAY_GROUP

pytestmark = pytest.mark.e2e

M0 = "m0__isvc-0000000000"
M1 = "m1__isvc-1111111111"


def _send(port: int, n: int, name: str = "m0") -> tuple[Counter[str], list[str]]:
    """n requests back to back on one keep-alive connection: answers by upstream, and failures."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: Counter[str] = Counter()
    bad: list[str] = []
    for _ in range(n):
        try:
            conn.request("POST", f"/v2/models/{name}/infer", body=b"{}")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                seen[json.loads(body)["upstream"]] += 1
            else:
                bad.append(f"{resp.status} {body[:160]!r}")
        except OSError as e:
            bad.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()
    return seen, bad


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_dead_copy_costs_no_request_and_copy_sets_move_cleanly(delta: bool) -> None:
    ups = {f"pod-{i}": Upstream(f"pod-{i}") for i in (1, 2)}
    act = Upstream("activator")
    for u in [*ups.values(), act]:
        u.__enter__()
    ads = AdsThread().start()
    try:
        dead = r.Endpoint("127.0.0.1", free_port(), free_port())  # a pod that was killed: nothing listens
        eps = {"pod-0": dead, **{p: r.Endpoint("127.0.0.1", u.port, u.port) for p, u in ups.items()}}
        admin = 0  # Envoy binds any free admin port; the harness reads it back

        def publish(pods: list[str], loaded: dict[str, list[str]]) -> None:
            state = r.RoutingState(pods={p: eps[p] for p in pods}, loaded=loaded, aliases={"m0": M0, "m1": M1},
                                   activator=r.Endpoint("127.0.0.1", act.port, act.port), registered={M0, M1})
            ads.set(GATEWAY_GROUP, matcher.build_all(state, r.ListenerConfig("127.0.0.1", 0, 0)))  # free ports, read back

        publish(["pod-0", "pod-1", "pod-2"], {M0: ["pod-0", "pod-1"], M1: ["pod-2"]})
        with envoy(gateway_bootstrap("gw-copies", "127.0.0.1", ads.port, admin, delta=delta), admin, concurrency=2) as gw:
            rest = gw.listener_port(r.REST)
            wait_for(lambda: get(f"http://127.0.0.1:{rest}/v2/models/m1/infer")[1].get("upstream") == "pod-2", 20, "routes in")
            # pod-0 holds a copy but is dead: every request still gets an answer, from pod-1
            # (the retry goes to the host not tried yet), and pod-0 is ejected at its first refusal.
            seen, bad = _send(rest, 200)
            assert not bad and seen == {"pod-1": 200}, (seen, bad[:5])
            stats = gw.stats(re.escape("cluster.pods_pod-0+pod-1_rest."))
            assert stats["cluster.pods_pod-0+pod-1_rest.outlier_detection.ejections_enforced_total"] >= 1, stats
            # Ejected at its first refusal: the requests after it don't try pod-0 at all.
            assert stats["cluster.pods_pod-0+pod-1_rest.upstream_rq_retry"] <= 2, stats
            # Placement withdraws pod-0 and re-places its copy on pod-2, and copy sets keep moving:
            # the route's cluster changes each time and the old one goes, under load, with no 503.
            steps = [
                (["pod-1", "pod-2"], {M0: ["pod-1"], M1: ["pod-2"]}),
                (["pod-1", "pod-2"], {M0: ["pod-1", "pod-2"], M1: ["pod-2"]}),
                (["pod-1", "pod-2"], {M0: ["pod-2"], M1: ["pod-1", "pod-2"]}),
                (["pod-1", "pod-2"], {M0: ["pod-1", "pod-2"], M1: ["pod-1"]}),
            ] * 3
            total: Counter[str] = Counter()
            for pods, loaded in steps:
                publish(pods, loaded)
                want = set(loaded[M0])
                wait_for(lambda: {c["name"] for c in _route_clusters(gw)} == {clusters.copies_cluster(loaded[M0], "rest")}, 10, f"{loaded}")
                seen, bad = _send(rest, 40)
                seen1, bad1 = _send(rest, 20, "m1")
                assert not bad and not bad1, (loaded, bad[:3], bad1[:3])
                assert set(seen) == want, (loaded, seen)  # both copies serve (round robin)
                total += seen
            assert sum(total.values()) == 40 * len(steps)
            # The sets no route names any more are gone from the gateway.
            names = {c["cluster"]["name"] for c in gw.config_dump("dynamic_active_clusters")}
            assert not [n for n in names if n.startswith("pods_") and n.endswith("_rest") and n != "pods_pod-1+pod-2_rest"], names
    finally:
        ads.stop()
        for u in [*ups.values(), act]:
            u.__exit__()


def _route_clusters(gw: object) -> list[dict]:
    """The clusters the REST route of /v2/models/m0 names, from the gateway's config dump."""
    out: list[dict] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "match" in node and "route" in node and node["match"].get("path") == "/v2/models/m0":
                a = node["route"]
                out.extend([{"name": a["cluster"]}] if "cluster" in a else a.get("weighted_clusters", {}).get("clusters", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(gw.config_dump("dynamic_route_configs"))  # type: ignore[attr-defined]
    return out
