"""Certificates made at test time: a CA, and leaf certificates it signs (EC P-256, valid for a
day from five minutes ago). The storage tests' HTTPS servers and e2e/test_tls.py's mTLS both
build on these. `cryptography` is imported on first use: a test without it skips itself."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Sequence

CertKey = tuple[Any, Any]  # (x509.Certificate, ec.EllipticCurvePrivateKey)


def _window(b: Any) -> Any:
    now = datetime.datetime.now(datetime.timezone.utc)
    return b.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))


def name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ca(cn: str) -> CertKey:
    """A self-signed CA that may sign leaves only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key()).serial_number(x509.random_serial_number())
    cert = (
        _window(b)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def leaf(issuer: CertKey, cn: str, usage: Sequence[Any], sans: Sequence[Any]) -> CertKey:
    """A certificate `issuer` signed, for `usage` (ExtendedKeyUsageOID values) and `sans`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer[0].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
    b = (
        _window(b)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer[1], hashes.SHA256()), key


def write(cert_path: Path, cert: Any, key: Any = None, key_path: Path | None = None) -> None:
    """PEM files: the certificate, and its key (PKCS8, owner-only) when given."""
    from cryptography.hazmat.primitives import serialization

    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None and key_path is not None:
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
