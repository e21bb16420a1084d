"""Handshake probes: what a TLS listener actually accepts, seen from a client.

Why probes rather than reading the configuration: what the inspector (or an attacker's
scanner) sees is what the socket negotiates, whatever the settings, the OpenSSL build,
the system's openssl.cnf or a test switch say. Each probe is one handshake with a client
context pinned to one protocol version (``minimum_version == maximum_version``) or one
family of suites, at OpenSSL security level 0 so the *client* never refuses what it is
asking about; nothing is sent after the handshake (no DICOM association, no HTTP
request). The certificate is read from the handshake too: the one served, not the file.
"""

from __future__ import annotations

import socket
import ssl
import warnings
from dataclasses import dataclass, field

PROTOCOLS: tuple[tuple[str, ssl.TLSVersion], ...] = (
    ("TLSv1", ssl.TLSVersion.TLSv1),
    ("TLSv1.1", ssl.TLSVersion.TLSv1_1),
    ("TLSv1.2", ssl.TLSVersion.TLSv1_2),
    ("TLSv1.3", ssl.TLSVersion.TLSv1_3),
)
OBSOLETE = frozenset({"TLSv1", "TLSv1.1"})
# Weak TLS 1.2 suite families (ANSSI TLS guide: forward secrecy, AEAD, no legacy ciphers).
# The OpenSSL cipher string of each; a family this OpenSSL cannot even offer is skipped.
WEAK_FAMILIES: tuple[tuple[str, str], ...] = (
    ("no forward secrecy (RSA key exchange)", "kRSA"),
    ("CBC mode", "HIGH:MEDIUM:!AESGCM:!CHACHA20:!AESCCM:!ARIAGCM:!kRSA:!aNULL:!eNULL"),
    ("3DES", "3DES"),
    ("RC4", "RC4"),
    ("anonymous or NULL", "aNULL:eNULL"),
)


@dataclass(frozen=True)
class Handshake:
    version: str
    cipher: str
    certificate: bytes | None  # DER


@dataclass
class ListenerProbe:
    kind: str  # "dicom_tls" / "https"
    host: str
    port: int
    protocols: dict[str, str] = field(default_factory=dict)  # version -> negotiated suite
    weak: dict[str, str] = field(default_factory=dict)  # family -> negotiated suite
    certificates: dict[str, bytes] = field(default_factory=dict)  # kind -> DER
    inconclusive: list[str] = field(default_factory=list)  # probes the server dropped
    error: str = ""  # why nothing could be asked (the listener is down?)


def _context(version: ssl.TLSVersion | None, ciphers: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a probe: we look at what is served, send no data
    if version is not None:
        with warnings.catch_warnings():  # asking for TLS 1.0/1.1 is this probe's purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version
            ctx.maximum_version = version
    # level 0: this client must be able to *ask* for what a hardened server should refuse
    ctx.set_ciphers(f"{ciphers or 'ALL:COMPLEMENTOFALL'}:@SECLEVEL=0")
    return ctx


REFUSED = "refused"  # the server answered with an alert: it does not accept this
DROPPED = "dropped"  # closed without a word: a connection limit, or a server that hangs up


def handshake(host: str, port: int, version: ssl.TLSVersion | None = None,
              ciphers: str | None = None, timeout: float = 3.0) -> Handshake | str:
    """One handshake: what was negotiated, ``REFUSED`` or ``DROPPED``. A port nobody
    listens on raises ``OSError``."""
    ctx = _context(version, ciphers)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_side=False) as tls:
            cipher = tls.cipher()
            return Handshake(tls.version() or "", cipher[0] if cipher else "",
                             tls.getpeercert(binary_form=True))
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError,
            ConnectionAbortedError, TimeoutError):
        return DROPPED
    except ssl.SSLError:
        return REFUSED


def _offerable(version: ssl.TLSVersion | None, ciphers: str | None) -> bool:
    """Whether this OpenSSL can even put such a hello together (no RC4 in the build...)."""
    try:
        _context(version, ciphers)
    except ssl.SSLError:
        return False
    return True


def _ask(result: ListenerProbe, what: str, version: ssl.TLSVersion, ciphers: str | None,
         timeout: float) -> Handshake | None:
    """One question. Some servers hang up on a hello they refuse instead of sending an
    alert (asyncio's TLS, behind the HTTPS port): a dropped probe counts as refused when
    a plain handshake right after succeeds, as inconclusive otherwise (a connection limit
    could hide an accepted protocol)."""
    done = handshake(result.host, result.port, version, ciphers, timeout)
    if isinstance(done, Handshake):
        return done
    if done == DROPPED and not isinstance(handshake(result.host, result.port, None, None,
                                                    timeout), Handshake):
        result.inconclusive.append(what)
    return None


def probe(kind: str, host: str, port: int, timeout: float = 3.0) -> ListenerProbe:
    """Every protocol version, the weak suite families, and each certificate kind.

    Few successful handshakes on purpose (three on a hardened listener): the DICOM
    listener keeps a per-source slot until its association timeout (30 s by default)
    after a client that completed the handshake hangs up, and the check must not use up
    the budget (8 by default) of the address it probes from."""
    result = ListenerProbe(kind, host, port)
    try:
        for name, version in PROTOCOLS:
            if not _offerable(version, None):
                continue
            # TLS 1.2: ask for the ECDSA certificate at the same time (then RSA below)
            first = "aECDSA" if version is ssl.TLSVersion.TLSv1_2 else None
            done = _ask(result, name, version, first, timeout)
            if done is None and first:
                done = _ask(result, name, version, None, timeout)
            if done is not None:
                result.protocols[name] = done.cipher
                if done.certificate:
                    kind_of = "ECDSA" if "ECDSA" in done.cipher else "default"
                    result.certificates.setdefault(kind_of, done.certificate)
        for family, ciphers in WEAK_FAMILIES:
            if _offerable(ssl.TLSVersion.TLSv1_2, ciphers):
                done = _ask(result, family, ssl.TLSVersion.TLSv1_2, ciphers, timeout)
                if done is not None:
                    result.weak[family] = done.cipher
        if "RSA" not in result.certificates:
            done = _ask(result, "RSA certificate", ssl.TLSVersion.TLSv1_2, "aRSA", timeout)
            if done is not None and done.certificate:
                result.certificates["RSA"] = done.certificate
    except OSError as exc:  # refused / unreachable: the listener is not there
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result
