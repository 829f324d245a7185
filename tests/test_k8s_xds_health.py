"""xds's HTTP listener in cluster mode (issue 7): /healthz for the readiness probe, /metrics for
Prometheus, both bindable on the pod IP (MESHSERVE_XDS_DEBUG_HOST), while /debug/config answers
only connections made to loopback. Kind: unit (no sockets but loopback); e2e/test_k8s_gateway.py
runs the real server against Valkey and Envoy."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from redis.exceptions import AuthenticationError

from meshserve.settings import Settings
from meshserve_xds.health import Health, arrived_on_loopback, bind_hosts, is_loopback, make_app


def test_loopback_default_is_kept() -> None:
    assert Settings().xds_debug_host == "127.0.0.1"
    assert bind_hosts(Settings().xds_debug_host) == ["127.0.0.1"]


def test_a_pod_ip_bind_keeps_loopback_for_port_forward() -> None:
    assert bind_hosts("10.1.2.3") == ["10.1.2.3", "127.0.0.1"]
    assert bind_hosts("0.0.0.0") == ["0.0.0.0"] and bind_hosts("::") == ["::"]
    assert bind_hosts("::1") == ["::1"]


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.6", True), ("::1", True), ("::ffff:127.0.0.1", True),
                                       ("localhost", True), ("10.1.2.3", False), ("::ffff:10.1.2.3", False), ("fe80::1%eth0", False)])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def _request(app, path: str, local: str):  # type: ignore[no-untyped-def]
    t = mock.Mock()
    t.get_extra_info.side_effect = lambda k, d=None: (local, 18001) if k == "sockname" else d
    return make_mocked_request("GET", path, transport=t, app=app)


async def _get(app, path: str, local: str):  # type: ignore[no-untyped-def]
    # The app as aiohttp serves it: route resolution and handler (Application._handle).
    return await app._handle(_request(app, path, local))


async def test_debug_config_answers_only_what_came_in_on_loopback() -> None:
    app = make_app(Health(lambda: True, None, revision=lambda: 7), lambda: {"gateways": []})
    app.freeze()
    assert arrived_on_loopback(_request(app, "/debug/config", "127.0.0.1"))
    ok = await _get(app, "/debug/config", "127.0.0.1")
    assert ok.status == 200 and b"gateways" in ok.body
    refused = await _get(app, "/debug/config", "10.1.2.3")
    assert refused.status == 403 and b"gateways" not in refused.body and b"loopback only" in refused.body
    # Health and metrics answer on the pod IP: that is what the bind is for.
    h = await _get(app, "/healthz", "10.1.2.3")
    assert h.status == 200 and b"revision 7" in h.body
    m = await _get(app, "/metrics", "10.1.2.3")
    assert m.status == 200 and b"python_info" in m.body


class _Ping:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    async def ping(self) -> bool:
        if self.exc is not None:
            raise self.exc
        return True


async def test_health_says_why_not_before_the_first_snapshot() -> None:
    built = False
    state = mock.Mock()
    state.r = _Ping(ConnectionRefusedError(111, "Connection refused"))
    h = Health(lambda: built, state, "redis://:s3cret@redis.example:6379/0")
    ok, reason = await h.check()
    assert not ok and "unreachable" in reason and "Connection refused" in reason
    assert "s3cret" not in reason and "redis.example" in reason  # the password never shows
    state.r = _Ping(AuthenticationError("invalid username-password pair"))
    ok, reason = await h.check()
    assert not ok and "refuses" in reason and "invalid username-password pair" in reason
    state.r = _Ping(None)
    ok, reason = await h.check()
    assert not ok and "answers; building it" in reason
    built = True
    state.r = _Ping(ConnectionRefusedError(111, "Connection refused"))
    ok, reason = await h.check()
    assert ok, "after the first snapshot a lost Redis must not make every gateway unready"
