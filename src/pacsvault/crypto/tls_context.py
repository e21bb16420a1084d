"""What a connection needs at handshake time: hardened TLS contexts, and what the
association policy reads from a verified peer certificate.

Apart from ``tls`` (the vault's CA and the certificates it issues): the listeners and
the outbound associations load these contexts at every start and for every opted-in
node's address, and never need the issuing code. Every name is re-exported by ``tls``.
"""

from __future__ import annotations

import logging
import os
import ssl
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from pacsvault.crypto.tls import TlsPaths

# TLS 1.2 suites: ECDHE only (forward secrecy) and AEAD only. TLS 1.3 suites are all AEAD+FS.
TLS12_CIPHERS = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:" \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384:" \
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305"
# The retired DICOM "AES TLS Secure Transport Connection Profile" (PS3.15 B.3):
# TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy. Only in the context used for the
# source address of a node opted in with ``tls_profile = "legacy-aes"``, after every
# suite above (server preference), so even that node gets ECDHE when it can.
LEGACY_AES_CIPHERS = ("AES128-SHA",)
# A node certificate's identity: URI SAN ``urn:pacsvault:node:<AE>`` (percent-encoded).
NODE_URI_PREFIX = "urn:pacsvault:node:"


@dataclass(frozen=True)
class PeerCertificate:
    """What the association policy needs from a verified client certificate."""

    serial: int
    common_name: str
    node_ae: str | None  # from the ``urn:pacsvault:node:`` URI SAN, None if absent
    client_auth: bool  # its extended key usage names clientAuth

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def peer_certificate(der: bytes) -> PeerCertificate | None:
    """Parse the certificate the TLS layer verified; None if it cannot be read."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        node_ae: str | None = None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                    if u.startswith(NODE_URI_PREFIX)]
            if len(uris) == 1:
                node_ae = unquote(uris[0][len(NODE_URI_PREFIX):])
        except x509.ExtensionNotFound:
            pass
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
        except x509.ExtensionNotFound:
            client_auth = False
        return PeerCertificate(cert.serial_number, cn, node_ae, client_auth)
    except ValueError:
        return None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Identities are in SANs. Without this, OpenSSL applies the CA's DNS name constraints
    # to a certificate's CN when it has no DNS SAN, and a dotted AE title ("CT.ROOM1") in a
    # node certificate's CN would be refused as a host name outside the constraints.
    ctx.hostname_checks_common_name = False


# Test only (issue 18): a server that accepts TLS 1.1, so a test can show that the
# security check's handshake probes catch an obsolete protocol (``tls.obsolete-protocol``,
# critical). Deliberately not a setting (settings files are copied and edited by hand):
# only this environment variable with exactly this value turns it on, it is logged as
# CRITICAL at every context built, and the nightly check reports it as critical.
TEST_ONLY_TLS11_ENV = "PACSVAULT_TEST_ONLY_ACCEPT_TLS11"
TEST_ONLY_TLS11_VALUE = "yes-weaken-every-tls-listener-for-a-test"
_TLS11_SUITES = ("ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA")  # TLS 1.1 has no AEAD


def _test_only_tls11(ctx: ssl.SSLContext, legacy_aes: bool) -> None:
    if os.environ.get(TEST_ONLY_TLS11_ENV) != TEST_ONLY_TLS11_VALUE:
        return
    logging.getLogger("pacsvault.tls").critical(
        "%s is set: this server accepts TLS 1.1 (tests only, never in production)",
        TEST_ONLY_TLS11_ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    legacy = LEGACY_AES_CIPHERS if legacy_aes else ()
    # OpenSSL 3 refuses TLS 1.1 (SHA-1 signatures) above security level 0
    ctx.set_ciphers(":".join((TLS12_CIPHERS, *legacy, *_TLS11_SUITES)) + ":@SECLEVEL=0")


def client_context(paths: TlsPaths, key_password: bytes) -> ssl.SSLContext:
    """For outbound associations: verify the peer against the vault CA, present our cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.load_verify_locations(cafile=str(paths.ca_cert))
    if paths.client_cert.exists() and paths.client_key.exists():
        ctx.load_cert_chain(paths.client_cert, paths.client_key, password=key_password)
    else:  # a vault made before client.crt existed, opened read-only
        ctx.load_cert_chain(paths.server_cert, paths.server_key, password=key_password)
    return ctx


def server_context(
    paths: TlsPaths, key_password: bytes, *, legacy_aes: bool = False
) -> ssl.SSLContext:
    """TLS 1.2+ only, forward-secret AEAD suites only; client certificates verified if sent.

    Both server certificates are loaded (ECDSA, then RSA when present): OpenSSL presents
    the one the client's suites and signature algorithms allow. ``legacy_aes`` adds the
    suites of ``LEGACY_AES_CIPHERS`` after the others: only for the source address of an
    opted-in node (``dicom/server.py`` chooses), never a listener's default.

    Client certificates are optional at the TLS layer and required per node by the
    association policy, so one port serves both kinds of node. OpenSSL verifies a client
    certificate for the TLS client purpose: one whose extended key usage lacks clientAuth
    (the server's own, a node's listener certificate) fails the handshake. Which node a
    certificate belongs to, and whether it is revoked, is the policy's job.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if legacy_aes:
        ctx.set_ciphers(":".join((TLS12_CIPHERS, *LEGACY_AES_CIPHERS)))
    _test_only_tls11(ctx, legacy_aes)
    ctx.load_cert_chain(paths.server_cert, paths.server_key, password=key_password)
    if paths.server_rsa_cert.exists() and paths.server_rsa_key.exists():
        ctx.load_cert_chain(paths.server_rsa_cert, paths.server_rsa_key,
                            password=key_password)
    ctx.load_verify_locations(cafile=str(paths.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
