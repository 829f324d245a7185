"""Issue 9: xDS over mutual TLS, the pure half. The settings decide whether TLS is on (all of
cert, key and CA, or none), and the bootstraps that dial the xDS server carry the client side:
Envoy's xds cluster gets an UpstreamTlsContext, grpcio's proxyless bootstrap gets `tls`
channel credentials. The real handshakes are in e2e/test_tls.py.

Kind: unit. No processes, no files read.
"""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from meshserve.settings import Settings
from meshserve_xds.bootstrap import XDS_CLUSTER, XdsClientTls, gateway_bootstrap, istio_bootstrap, proxyless_bootstrap

TLS = XdsClientTls(ca="/certs/ca.pem", cert="/certs/client.pem", key="/certs/client-key.pem", server_name="xds.example")


def _xds_cluster(boot_json: str):  # type: ignore[no-untyped-def]
    b = json_format.Parse(boot_json, bootstrap_pb2.Bootstrap())
    (c,) = [c for c in b.static_resources.clusters if c.name == XDS_CLUSTER]
    return c


def test_plaintext_by_default() -> None:
    s = Settings()
    assert s.xds_tls is False and XdsClientTls.from_settings(s) is None
    assert not _xds_cluster(gateway_bootstrap("g", "127.0.0.1", 18000, 9901)).HasField("transport_socket")
    creds = json.loads(proxyless_bootstrap("p", "127.0.0.1", 18000))["xds_servers"][0]["channel_creds"]
    assert creds == [{"type": "insecure"}]


@pytest.mark.parametrize("fields, missing", [
    ({"xds_tls_cert": "c"}, "MESHSERVE_XDS_TLS_KEY, MESHSERVE_XDS_TLS_CA"),
    ({"xds_tls_cert": "c", "xds_tls_key": "k"}, "MESHSERVE_XDS_TLS_CA"),
    ({"xds_tls_ca": "a"}, "MESHSERVE_XDS_TLS_CERT, MESHSERVE_XDS_TLS_KEY"),
])
def test_half_configured_tls_is_an_error_naming_what_is_missing(fields: dict[str, str], missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        Settings(**fields).xds_tls  # noqa: B018


def test_client_cert_without_key_or_without_server_tls_is_an_error() -> None:
    with pytest.raises(ValueError, match="CLIENT_KEY"):
        Settings(xds_tls_cert="c", xds_tls_key="k", xds_tls_ca="a", xds_tls_client_cert="cc").xds_tls  # noqa: B018
    with pytest.raises(ValueError, match="xDS TLS is off"):
        Settings(xds_tls_client_cert="cc", xds_tls_client_key="ck").xds_tls  # noqa: B018


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"CERT": "s.pem", "KEY": "s-key.pem", "CA": "ca.pem", "CLIENT_CERT": "c.pem", "CLIENT_KEY": "c-key.pem", "SERVER_NAME": "xds.local"}.items():
        monkeypatch.setenv(f"MESHSERVE_XDS_TLS_{k}", v)
    t = XdsClientTls.from_settings(Settings.from_env())
    assert t == XdsClientTls(ca="ca.pem", cert="c.pem", key="c-key.pem", server_name="xds.local")


def test_client_falls_back_to_the_server_certificate() -> None:
    t = XdsClientTls.from_settings(Settings(xds_tls_cert="s.pem", xds_tls_key="s-key.pem", xds_tls_ca="ca.pem"))
    assert t == XdsClientTls(ca="ca.pem", cert="s.pem", key="s-key.pem", server_name="meshserve-xds")


@pytest.mark.parametrize("make", [
    lambda: gateway_bootstrap("g", "127.0.0.1", 18000, 9901, tls=TLS),
    lambda: gateway_bootstrap("g", "127.0.0.1", 18000, 9901, delta=True, tls=TLS),
    lambda: istio_bootstrap("i", "127.0.0.1", 18000, 9901, 8008, tls=TLS),
])
def test_envoy_xds_cluster_dials_mtls(make) -> None:  # type: ignore[no-untyped-def]
    c = _xds_cluster(make())
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    assert c.transport_socket.typed_config.Unpack(ctx)
    assert ctx.sni == "xds.example"
    common = ctx.common_tls_context
    (cert,) = common.tls_certificates
    assert (cert.certificate_chain.filename, cert.private_key.filename) == ("/certs/client.pem", "/certs/client-key.pem")
    assert common.validation_context.trusted_ca.filename == "/certs/ca.pem"
    (san,) = common.validation_context.match_typed_subject_alt_names
    assert san.san_type == san.DNS and san.matcher.exact == "xds.example"
    assert list(common.alpn_protocols) == ["h2"]


def test_bootstrap_names_files_and_holds_no_key_material() -> None:
    text = gateway_bootstrap("g", "127.0.0.1", 18000, 9901, tls=TLS)
    assert "PRIVATE KEY" not in text and "inlineBytes" not in text and "inlineString" not in text


def test_proxyless_bootstrap_uses_tls_channel_creds() -> None:
    doc = json.loads(proxyless_bootstrap("p", "127.0.0.1", 18000, tls=TLS))
    (server,) = doc["xds_servers"]
    assert server["server_uri"] == "127.0.0.1:18000"
    assert server["channel_creds"] == [{"type": "tls", "config": {
        "ca_certificate_file": "/certs/ca.pem", "certificate_file": "/certs/client.pem", "private_key_file": "/certs/client-key.pem"}}]
