"""The vault's local certificate authority, its certificates, and hardened TLS contexts.

A practice has no PKI: the vault brings its own CA so DICOM TLS works on day one, and can
issue client certificates to the modalities that must prove who they are. Private keys at
rest are PKCS#8 encrypted with a key derived from the master key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# TLS 1.2 suites: ECDHE only (forward secrecy) and AEAD only. TLS 1.3 suites are all AEAD+FS.
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:" \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384:" \
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305"

CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class TlsPaths:
    """Where a vault keeps its TLS material (under DATA/tls)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key.enc"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key.enc"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def local_names() -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Host names and addresses a practice workstation may use to reach this server."""
    names = {"localhost", socket.gethostname()}
    fqdn = socket.getfqdn()
    if fqdn and "." in fqdn:
        names.add(fqdn)
    addrs: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    addr = ipaddress.ip_address(entry.address.split("%")[0])
                except ValueError:
                    continue
                if not addr.is_link_local:
                    addrs.add(addr)
    return sorted(names), sorted(addrs, key=str)


def _encryption(password: bytes) -> serialization.KeySerializationEncryption:
    return serialization.BestAvailableEncryption(password)


def create_authority(paths: TlsPaths, key_password: bytes, common_name: str) -> None:
    """Create the CA and the server certificate (ECDSA P-256)."""
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsvault"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"pacsvault local CA {common_name}"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        paths.ca_key,
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            _encryption(key_password),
        ),
    )
    names, addrs = local_names()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addrs]
    cert_pem, key_pem = issue(paths, key_password, common_name, sans)
    paths.server_cert.write_bytes(cert_pem)
    _write_private(paths.server_key, key_pem)


def _load_ca(
    paths: TlsPaths, key_password: bytes
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), key_password)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("unexpected CA key type")
    return ca_cert, ca_key


def issue(
    paths: TlsPaths,
    key_password: bytes,
    common_name: str,
    sans: list[x509.GeneralName],
    *,
    encrypt_key: bool = True,
) -> tuple[bytes, bytes]:
    """Issue a leaf certificate; returns (certificate PEM, private key PEM).

    Every leaf is good for both TLS roles: the server also calls out (C-MOVE sub-operations)
    and a node's certificate also serves its own listener (C-MOVE destination).
    """
    ca_cert, ca_key = _load_ca(paths, key_password)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    encryption: serialization.KeySerializationEncryption = (
        _encryption(key_password) if encrypt_key else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_node(
    paths: TlsPaths, key_password: bytes, ae_title: str, host: str, out_dir: Path
) -> list[Path]:
    """Write a node's certificate (SAN = its host); its key is plain PEM for the device."""
    cert_pem, key_pem = issue(
        paths, key_password, ae_title, [_host_san(host)], encrypt_key=False
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, cert_path, ca_path = (
        out_dir / f"{ae_title}.key", out_dir / f"{ae_title}.crt", out_dir / "ca.crt"
    )
    _write_private(key_path, key_pem)
    cert_path.write_bytes(cert_pem)
    ca_path.write_bytes(paths.ca_cert.read_bytes())
    return [key_path, cert_path, ca_path]


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def client_context(paths: TlsPaths, key_password: bytes) -> ssl.SSLContext:
    """For outbound associations: verify the peer against the vault CA, present our cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.load_verify_locations(cafile=str(paths.ca_cert))
    ctx.load_cert_chain(paths.server_cert, paths.server_key, password=key_password)
    return ctx


def server_context(paths: TlsPaths, key_password: bytes) -> ssl.SSLContext:
    """TLS 1.2+ only, forward-secret AEAD suites only; client certificates verified if sent.

    Client certificates are optional at the TLS layer and required per node by the
    association policy, so one port serves both kinds of node.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(paths.server_cert, paths.server_key, password=key_password)
    ctx.load_verify_locations(cafile=str(paths.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def certificate_expiry(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
