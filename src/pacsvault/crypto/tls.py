"""The vault's local certificate authority and its certificates (the hardened TLS contexts
and the reading of a peer's certificate are ``tls_context``, re-exported here).

A practice has no PKI: the vault brings its own CA so DICOM TLS works on day one, and can
issue client certificates to the modalities that must prove who they are. Private keys at
rest are PKCS#8 encrypted with a key derived from the master key.

Practices install ``ca.crt`` in their workstations' browsers, so the CA is name-constrained
(critical): it can only vouch for this server's own names, private-use DNS suffixes and
private/loopback address ranges. A stolen CA key therefore cannot mint a certificate a
browser would accept for a bank's domain.

Each certificate does one job (one extended key usage):

* ``server.crt``: serverAuth only, the listeners (DICOM TLS, HTTPS);
* ``server-rsa.crt``: the same names and role with an RSA 3072 key, loaded beside
  ``server.crt`` in the same context so modalities whose TLS stack knows only RSA
  certificates connect (OpenSSL picks the certificate the client's suites allow);
* ``client.crt``: clientAuth only, what the vault presents when it calls out (C-MOVE);
* a node's ``<AE>.crt``: clientAuth only, CN = AE title and URI SAN
  ``urn:pacsvault:node:<AE>`` (percent-encoded), valid ``NODE_DAYS``; the association
  policy accepts it only from that calling AE and only if its serial is recorded for that
  node and not revoked;
* a node's ``<AE>-listener.crt`` (only for a TLS node with a port, i.e. a C-MOVE
  destination): serverAuth only, SAN = the node's host.

``crl.pem`` (public) lists revoked node certificates, signed by the CA, for any other
verifier; the server itself reads revocations from the index, so a revocation applies to
the next association without a restart.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

# the handshake side, re-exported for its importers (``tls_context``)
from pacsvault.crypto.tls_context import LEGACY_AES_CIPHERS as LEGACY_AES_CIPHERS
from pacsvault.crypto.tls_context import NODE_URI_PREFIX as NODE_URI_PREFIX
from pacsvault.crypto.tls_context import TLS12_CIPHERS as TLS12_CIPHERS
from pacsvault.crypto.tls_context import PeerCertificate as PeerCertificate
from pacsvault.crypto.tls_context import client_context as client_context
from pacsvault.crypto.tls_context import peer_certificate as peer_certificate
from pacsvault.crypto.tls_context import server_context as server_context
from pacsvault.fsutil import write_atomic, write_durably

RSA_SERVER_BITS = 3072

CA_DAYS = 3650
LEAF_DAYS = 825
# Node certificates live on devices we do not control: short enough that a forgotten one
# dies on its own, long enough not to stop a modality every year.
NODE_DAYS = 730
# nextUpdate of the published CRL; it is re-signed whenever the vault opens past half of it.
CRL_DAYS = 180
# Certificates and the CRL are public: replaced atomically (readers never see half of
# one), readable by every verifier.
PUBLIC_MODE = 0o644

SERVER_URI_PREFIX = "urn:pacsvault:server:"

# What the CA may certify besides the server's own names and addresses: names that no
# public registry hands out, and address ranges that are never routed on the internet.
PRIVATE_DNS_SUFFIXES = ("localhost", "local", "lan", "home.arpa", "internal", "localdomain")
PRIVATE_NETWORKS = (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10",
)

ServerAuth = ExtendedKeyUsageOID.SERVER_AUTH
ClientAuth = ExtendedKeyUsageOID.CLIENT_AUTH


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

    @property
    def server_rsa_cert(self) -> Path:
        """The server's RSA certificate, for RSA-only TLS stacks (same names)."""
        return self.root / "server-rsa.crt"

    @property
    def server_rsa_key(self) -> Path:
        return self.root / "server-rsa.key.enc"

    @property
    def client_cert(self) -> Path:
        """The vault's own client certificate for outbound associations (C-MOVE)."""
        return self.root / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.root / "client.key.enc"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_durably(fd, [data])
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


def name_constraints(
    names: Iterable[str], addrs: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> x509.NameConstraints:
    """Permitted subtrees: the server's names and addresses plus private-use ones.

    DNS and IP only: both are understood by OpenSSL, Chromium, NSS and Windows. No URI
    subtree, since node identities are ``urn:`` URIs without a host that verifiers could not
    match (names of a type without any constraint stay allowed).
    """
    dns = list(dict.fromkeys([*PRIVATE_DNS_SUFFIXES, *(n.lower().rstrip(".") for n in names)]))
    nets = [ipaddress.ip_network(n) for n in PRIVATE_NETWORKS]
    for addr in addrs:
        if not any(addr in net for net in nets):
            nets.append(ipaddress.ip_network(addr))
    permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in dns if d]
    permitted += [x509.IPAddress(n) for n in nets]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)


def create_authority(paths: TlsPaths, key_password: bytes, common_name: str) -> None:
    """Create the name-constrained CA, the server and the outbound client certificates
    (ECDSA P-256), and an empty CRL."""
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    names, addrs = local_names()
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
        .add_extension(name_constraints(names, addrs), critical=True)
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
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addrs]
    cert_pem, key_pem = issue(paths, key_password, common_name, sans, eku=[ServerAuth])
    paths.server_cert.write_bytes(cert_pem)
    _write_private(paths.server_key, key_pem)
    create_rsa_server_cert(paths, key_password)
    create_client_cert(paths, key_password, common_name)
    write_crl(paths, key_password, [])


def create_client_cert(paths: TlsPaths, key_password: bytes, ae_title: str) -> None:
    """The vault's certificate for its outbound associations: clientAuth only, so it can
    never pass for the server, and no node identity, so no node can use it to call in.
    (Vaults made before it existed get it when opened; until then they present
    ``server.crt``.)"""
    cert_pem, key_pem = issue(
        paths, key_password, ae_title,
        [x509.UniformResourceIdentifier(SERVER_URI_PREFIX + quote(ae_title, safe=""))],
        eku=[ClientAuth],
    )
    _write_private(paths.client_key, key_pem)
    write_atomic(paths.client_cert, cert_pem, PUBLIC_MODE)


def create_rsa_server_cert(paths: TlsPaths, key_password: bytes) -> None:
    """``server-rsa.crt``: the ECDSA server certificate's subject and names with an RSA
    3072 key (serverAuth only). Vaults made before it existed get it when opened."""
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cns = server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        sans = list(server.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    cert, key_pem = _issue(paths, key_password, str(cns[0].value) if cns else "pacsvault",
                           sans, eku=[ServerAuth], days=LEAF_DAYS, encrypt_key=True,
                           rsa_bits=RSA_SERVER_BITS)
    _write_private(paths.server_rsa_key, key_pem)
    write_atomic(paths.server_rsa_cert, cert.public_bytes(serialization.Encoding.PEM),
                 PUBLIC_MODE)


def rotate_authority(paths: TlsPaths, key_password: bytes, common_name: str) -> Path:
    """Replace the CA (and with it the server, client certificates and CRL) by a new,
    name-constrained one; the old files move to ``tls/retired-<UTC time>/`` (0700).

    For vaults made before the CA was constrained. Every node certificate and every PC that
    trusts the old ``ca.crt`` must then be re-issued / re-installed: that is the price of
    removing a CA that could vouch for any name.
    """
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    retired = paths.root / f"retired-{stamp}"
    retired.mkdir(mode=0o700)
    for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key,
                 paths.server_rsa_cert, paths.server_rsa_key, paths.client_cert,
                 paths.client_key, paths.crl):
        if path.exists():
            os.replace(path, retired / path.name)
    try:
        create_authority(paths, key_password, common_name)
    except BaseException:
        for old in retired.iterdir():  # put the working CA back
            os.replace(old, paths.root / old.name)
        retired.rmdir()
        raise
    return retired


def ca_is_name_constrained(paths: TlsPaths) -> bool:
    """False for vaults made before the CA carried name constraints (shown by ``status``)."""
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    try:
        return ca.extensions.get_extension_for_class(x509.NameConstraints).critical
    except x509.ExtensionNotFound:
        return False


@dataclass(frozen=True)
class Revoked:
    serial: int
    when: dt.datetime


def write_crl(paths: TlsPaths, key_password: bytes, revoked: Sequence[Revoked]) -> None:
    """Sign and publish ``crl.pem`` (always present, even empty: a verifier with CRL
    checking on fails every handshake when the CA's CRL is missing)."""
    ca_cert, ca_key = _load_ca(paths, key_password)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    for item in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(item.serial)
            .revocation_date(item.when)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    write_atomic(paths.crl, crl.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def crl_needs_refresh(paths: TlsPaths, revoked_serials: set[int]) -> bool:
    """Missing, unreadable, past half its validity, or not listing exactly these serials."""
    try:
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    except (OSError, ValueError):
        return True
    next_update = crl.next_update_utc
    if next_update is None or next_update - _now() < dt.timedelta(days=CRL_DAYS / 2):
        return True
    return {r.serial_number for r in crl} != revoked_serials


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
    eku: Sequence[ObjectIdentifier],
    days: int = LEAF_DAYS,
    encrypt_key: bool = True,
) -> tuple[bytes, bytes]:
    """Issue a leaf certificate; returns (certificate PEM, private key PEM).

    One role per certificate (``eku``): a client certificate can never pass for a server,
    nor the server's certificate for a client (OpenSSL checks the purpose on each side).
    """
    cert, key_pem = _issue(paths, key_password, common_name, sans, eku=eku, days=days,
                           encrypt_key=encrypt_key)
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _issue(
    paths: TlsPaths,
    key_password: bytes,
    common_name: str,
    sans: list[x509.GeneralName],
    *,
    eku: Sequence[ObjectIdentifier],
    days: int,
    encrypt_key: bool,
    rsa_bits: int | None = None,
) -> tuple[x509.Certificate, bytes]:
    ca_cert, ca_key = _load_ca(paths, key_password)
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, rsa_bits) if rsa_bits
        else ec.generate_private_key(ec.SECP256R1())
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                # RSA key transport (the legacy AES profile) needs keyEncipherment
                digital_signature=True, content_commitment=False,
                key_encipherment=rsa_bits is not None,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
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
    return cert, key_pem


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def node_uri(ae_title: str) -> str:
    """The URI SAN naming a node (AE titles may hold spaces and other URI-unsafe bytes)."""
    return NODE_URI_PREFIX + quote(ae_title, safe="")


@dataclass(frozen=True)
class IssuedCert:
    """A certificate just issued for a node, to record in the registry."""

    kind: str  # "client" or "listener"
    serial: int
    not_after: dt.datetime
    path: Path


def permits(paths: TlsPaths, name: x509.GeneralName) -> bool:
    """Whether the CA's name constraints allow ``name`` (always true for an old CA)."""
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    try:
        nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return True
    for sub in nc.permitted_subtrees or []:
        if isinstance(name, x509.DNSName) and isinstance(sub, x509.DNSName):
            host, base = name.value.lower().rstrip("."), sub.value.lower().lstrip(".")
            if host == base or host.endswith("." + base):
                return True
        if isinstance(name, x509.IPAddress) and isinstance(sub, x509.IPAddress):
            net = sub.value
            addr = name.value
            if isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network) and isinstance(
                addr, ipaddress.IPv4Address | ipaddress.IPv6Address
            ) and addr.version == net.version and addr in net:
                return True
    return False


def issue_node(
    paths: TlsPaths,
    key_password: bytes,
    ae_title: str,
    host: str,
    out_dir: Path,
    *,
    listener: bool = False,
) -> list[IssuedCert]:
    """Write a node's client certificate (and its listener's, if asked and its host is a
    name the CA may certify), the keys as plain PEM for the device, and ``ca.crt``.

    Every file is 0600 in a 0700 folder: keys are secrets, and the rest is nobody else's
    business on a shared PC.
    """
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    issued: list[IssuedCert] = []
    jobs: list[tuple[str, str, list[x509.GeneralName], ObjectIdentifier]] = [
        ("client", ae_title, [x509.UniformResourceIdentifier(node_uri(ae_title))], ClientAuth)
    ]
    host_san = _host_san(host)
    if listener and permits(paths, host_san):
        jobs.append(("listener", f"{ae_title}-listener", [host_san], ServerAuth))
    for kind, stem, sans, usage in jobs:
        cert, key_pem = _issue(paths, key_password, ae_title, sans, eku=[usage],
                               days=NODE_DAYS, encrypt_key=False)
        key_path, cert_path = out_dir / f"{stem}.key", out_dir / f"{stem}.crt"
        _write_private(key_path, key_pem)
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        issued.append(IssuedCert(kind, cert.serial_number, cert.not_valid_after_utc,
                                 cert_path))
    _write_private(out_dir / "ca.crt", paths.ca_cert.read_bytes())
    return issued


def certificate_expiry(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
