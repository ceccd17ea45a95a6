"""A small private PKI for one federation's broker (``cryptography``): a CA, a server
certificate for the broker's host names, optional client certificates and the certificate
revocation list (``crl.pem``) that the broker checks them against."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest lifetime common TLS clients accept for server certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CA-HFP Edge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _write_key(key, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load(dir_: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((dir_ / "ca.key").read_bytes(), None)
    return key, x509.load_pem_x509_certificate((dir_ / "ca.crt").read_bytes())


def make_ca(dir_: Path, name: str) -> None:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} CA"))
        .issuer_name(_name(f"{name} CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key, dir_ / "ca.key")
    _write_cert(cert, dir_ / "ca.crt")


def issue(
    dir_: Path, stem: str, common: str, hosts: list[str] | None = None, client: bool = False
) -> x509.Certificate:
    """Sign ``<stem>.key``/``<stem>.crt`` with the CA in ``dir_``: a server certificate for
    ``hosts`` (DNS names or IP addresses) or a client certificate."""
    ca_key, ca_cert = _load(dir_)
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if hosts:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key, dir_ / f"{stem}.key")
    _write_cert(cert, dir_ / f"{stem}.crt")
    return cert


CRL = "crl.pem"


def _revoked(dir_: Path) -> list[x509.RevokedCertificate]:
    path = dir_ / CRL
    return list(x509.load_pem_x509_crl(path.read_bytes())) if path.is_file() else []


def revoked_serials(dir_: Path) -> set[int]:
    """Serial numbers listed in ``dir_/crl.pem`` (none when there is no list yet)."""
    return {entry.serial_number for entry in _revoked(dir_)}


def write_crl(dir_: Path, revoke: x509.Certificate | None = None) -> None:
    """(Re)sign ``dir_/crl.pem`` with the CA: the entries already listed, plus ``revoke``.

    The list is valid until the CA expires: a broker that checks revocation refuses every
    client certificate once its list is out of date, so the list must not expire first."""
    ca_key, ca_cert = _load(dir_)
    entries = _revoked(dir_)
    if revoke is not None:
        if revoke.issuer != ca_cert.subject:
            raise ValueError(f"{revoke.subject.rfc4514_string()} was not issued by this CA")
        if revoke.serial_number not in {e.serial_number for e in entries}:
            entries.append(
                x509.RevokedCertificateBuilder()
                .serial_number(revoke.serial_number)
                .revocation_date(dt.datetime.now(dt.timezone.utc))
                .build()
            )
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    (dir_ / CRL).write_bytes(crl.public_bytes(serialization.Encoding.PEM))
