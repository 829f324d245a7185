"""Real storage servers for the storage tests, each a process bound to 127.0.0.1 and always
stopped: moto (S3, optionally behind TLS with a test CA), gcp-storage-emulator (GCS, from PyPI:
the test extra) and Azurite (Azure Blob, from npm: installed once into a cache dir, the tests
skip with a message only when npm itself is missing)."""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from meshserve_testing.devmesh import announced, free_port, http_get, moto_url, stop, wait_until

# Azurite's well-known development account (documented by Microsoft, the same in every Azurite).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_VERSION = "3"  # npm range: the 3.x line
CACHE = Path(os.environ.get("MESHSERVE_TEST_CACHE") or Path.home() / ".cache" / "meshserve-test")


# --- TLS: a test CA and a server certificate it signed -----------------------------------------


@dataclass
class ServerCA:
    ca_pem: str  # the CA certificate: what a storage-config's `certificate` holds
    cert: Path  # the server's certificate (for 127.0.0.1 and localhost) and key
    key: Path


def make_ca(d: Path) -> ServerCA:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshserve test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ServerCA(ca.public_bytes(serialization.Encoding.PEM).decode(), d / "server.pem", d / "server.key")


# --- S3: moto ------------------------------------------------------------------------------------


@contextmanager
def moto_server(tls: ServerCA | None = None) -> Iterator[str]:
    """moto in server mode on a port of its own choosing (port 0, read back from its start-up
    line); with `tls`, HTTPS with that CA's server certificate. Yields the URL."""
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
    if tls:
        args += ["--ssl-cert", str(tls.cert), "--ssl-key", str(tls.key)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = moto_url(proc)
        if tls:
            ctx = ssl.create_default_context(cadata=tls.ca_pem)

            def up() -> bool:
                with urllib.request.urlopen(url + "/moto-api/", timeout=5, context=ctx) as r:
                    return r.status == 200
        else:
            def up() -> bool:
                return http_get(url + "/moto-api/")[0] == 200
        wait_until(lambda: proc.poll() is not None or up(), 30, "moto server")
        assert proc.poll() is None, "moto server exited at start"
        yield url
    finally:
        stop(proc)


# --- GCS: gcp-storage-emulator --------------------------------------------------------------------


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator (PyPI, the test extra), in memory. Yields its URL: the client's
    api_endpoint, and a gcs store's endpoint_url."""
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is in the test extra: run `make install`")
    # It can't report a port it bound (it prints the one it was given, and puts it in URLs):
    # a reserved port (meshserve.ports).
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(port), "-M", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or http_get(url + "/storage/v1/b")[0] == 200, 30, "GCS emulator")
        assert proc.poll() is None, "gcp-storage-emulator exited at start"
        yield url
    finally:
        stop(proc)


# --- Azure Blob: Azurite ----------------------------------------------------------------------------


def azurite_bin() -> Path:
    """Azurite's blob server, `npm install`ed once into CACHE/azurite (a file lock keeps two
    test runs from installing at once). Skips only when npm is missing; a failed install fails."""
    d = CACHE / "azurite"
    exe = d / "node_modules" / ".bin" / "azurite-blob"
    if exe.exists():
        return exe
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("Azure Blob tests need Azurite, installed from npm: install Node.js and npm (apt-get install npm)")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not exe.exists():
            r = subprocess.run([npm, "install", "--prefix", str(d), "--no-save", "--no-audit", "--no-fund", f"azurite@{AZURITE_VERSION}"],
                               capture_output=True, text=True, timeout=240)  # within pytest's 300 s
            if r.returncode != 0 or not exe.exists():
                pytest.fail(f"npm install azurite into {d} failed ({r.returncode}): {r.stderr[-2000:]}")
    return exe


@contextmanager
def azurite(workdir: Path) -> Iterator[str]:
    """Azurite's blob service on 127.0.0.1, a port of its own choosing (port 0, read back from
    its start-up line), in memory. Yields the account URL (path style)."""
    exe = azurite_bin()
    proc = subprocess.Popen(
        [str(exe), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence", "--extentMemoryLimit", "256",
         "--skipApiVersionCheck", "--disableTelemetry"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
    )
    try:
        base = announced(proc, r"listens on (http://127\.0\.0\.1:\d+)", 60, "Azurite blob service listening")[1]
        yield f"{base}/{AZURITE_ACCOUNT}"
    finally:
        stop(proc)


def azurite_connection_string(account_url: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={account_url};")
