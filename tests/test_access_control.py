"""Who may talk to the archive: each refusal happens, with the right reason, and is recorded.

Unknown calling AE, wrong host, wrong called AE, transport requirements, removed nodes and
roles are checked against one running server; an untrusted source address needs a server
whose trusted networks exclude it, so it gets its own. The TLS port must refuse plaintext
and TLS 1.0/1.1 and offer TLS 1.2 (ECDHE + AEAD) and 1.3.

All traffic stays on loopback: the server listens on 127.0.0.1 and some clients bind their
source address to 127.0.0.2 (Linux routes the whole of 127.0.0.0/8 on ``lo``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE as ClientAE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.harness.served import Served, served_vault
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    echoscu,
    events,
    wait_events,
)

# every test here starts a server (or shares one): out of the quick loops
pytestmark = pytest.mark.slow

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4)
RESULT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON = 0x01
REASON_CALLING_AE = 0x03
REASON_CALLED_AE = 0x07
STATUS_NOT_AUTHORIZED = 0x0124

LOCAL = "127.0.0.1"
OTHER = "127.0.0.2"  # another loopback source address

# AE titles registered on the shared server
MODALITY = "MODALITY"  # plain, 127.0.0.1, store
REMOTE = "REMOTE2"  # registered at 127.0.0.2
TLSONLY = "TLSONLY"  # --tls
CERTMOD = "CERTMOD"  # --client-cert
QUERYONLY = "QUERYONLY"  # --roles query
GOING = "GOING"  # removed during a test


# --- local helpers ------------------------------------------------------------------------


@dataclass
class Env(Served):
    certs: Path
    root: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("access")
    certs = root / "certs"
    with served_vault(root / "v", nodes=[
        (MODALITY, (), LOCAL),
        (REMOTE, (), OTHER),
        (TLSONLY, ("--tls",), LOCAL),
        (CERTMOD, ("--client-cert",), LOCAL),
        (QUERYONLY, ("--roles", "query"), LOCAL),
        (GOING, (), LOCAL),
    ], prepare=lambda vault: vault.cli("node", "cert", CERTMOD, "--out", certs)) as served:
        yield Env(served.vault, served.server, certs, root)


def associate(
    port: int,
    *,
    calling: str,
    called: str = AE,
    source: str | None = None,
    contexts: list[tuple[str, str]] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Association:
    """Request an association with pynetdicom (gives access to the A-ASSOCIATE-RJ fields)."""
    ae = ClientAE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    if contexts:
        for abstract, syntax in contexts:
            ae.add_requested_context(abstract, syntax)
    else:
        ae.add_requested_context(Verification)
    return ae.associate(
        LOCAL, port, ae_title=called,
        bind_address=(source, 0) if source else None,
        tls_args=(tls, LOCAL) if tls else None,
    )


def assert_rejected(assoc: Association, reason: int) -> None:
    assert assoc.is_rejected, "association was not rejected with an A-ASSOCIATE-RJ"
    assert not assoc.is_established
    rj = assoc.acceptor.primitive
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (
        RESULT_PERMANENT, SOURCE_SERVICE_USER, reason
    ), f"rejected with {rj.result_str} / {rj.source_str} / {rj.reason_str}"


def assert_echo_ok(assoc: Association) -> None:
    try:
        assert assoc.is_established, "association was not accepted"
        status = assoc.send_c_echo()
        assert status is not None and status.Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def client_context(
    ca: Path | None, *, min_v: ssl.TLSVersion, max_v: ssl.TLSVersion, weak: bool = False
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        # Python warns when TLS 1.0/1.1 are enabled; offering them is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = min_v
        ctx.maximum_version = max_v
    if weak:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def tls_handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """Handshake with the TLS port; returns (version, cipher name). Raises on failure."""
    with socket.create_connection((LOCAL, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=LOCAL) as tls:
        cipher = tls.cipher()
        return tls.version(), cipher[0] if cipher else None


def raw_client_hello(version: int, ciphers: list[int]) -> bytes:
    """A minimal TLS ClientHello, independent of what the local OpenSSL may offer."""
    exts = b""
    # supported_groups: secp256r1, x25519
    groups = struct.pack("!HHH", 4, 0x0017, 0x001D)
    exts += struct.pack("!HH", 0x000A, len(groups)) + groups
    # ec_point_formats: uncompressed
    exts += struct.pack("!HHBB", 0x000B, 2, 1, 0)
    # signature_algorithms (TLS 1.2): ecdsa_secp256r1_sha256, rsa_pkcs1_sha256
    algs = struct.pack("!HHH", 4, 0x0403, 0x0401)
    exts += struct.pack("!HH", 0x000D, len(algs)) + algs
    suites = b"".join(struct.pack("!H", c) for c in ciphers)
    body = (
        struct.pack("!H", version) + os.urandom(32) + b"\x00"
        + struct.pack("!H", len(suites)) + suites + b"\x01\x00"
        + struct.pack("!H", len(exts)) + exts
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def raw_tls_answer(port: int, hello: bytes) -> bytes:
    """Send a ClientHello and return the first record header + 2 bytes (b'' if closed)."""
    with socket.create_connection((LOCAL, port), timeout=10) as s:
        s.sendall(hello)
        data = b""
        try:
            while len(data) < 7:
                chunk = s.recv(7 - len(data))
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        return data


def foreign_client_cert(out: Path, cn: str) -> tuple[Path, Path]:
    """A CA of our own and a client certificate it signed: not the vault's CA."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the vault CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{cn}.key", out / f"{cn}.crt"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def handshake_failures(vault: VaultDir, reason: str) -> int:
    """How many refused TLS handshakes were recorded with this OpenSSL reason."""
    return sum(e["message"] == reason for e in events(vault, "dicom.tls.handshake_failed"))


def wait_handshake_failures(vault: VaultDir, reason: str, at_least: int) -> int:
    deadline = time.monotonic() + 5
    while (n := handshake_failures(vault, reason)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def rejected_events(
    vault: VaultDir, ae: str, address: str = LOCAL, *, timeout: float = 5
) -> list[dict[str, object]]:
    """Rejections recorded for ``ae`` from ``address`` (timeout=0: no waiting)."""
    return wait_events(
        vault, "dicom.association.rejected",
        lambda e: e["ae"] == ae and e["address"] == address, timeout=timeout,
    )


# --- association policy -------------------------------------------------------------------


def test_unknown_calling_ae_is_rejected_and_recorded(env: Env) -> None:
    assert_rejected(associate(env.server.port, calling="STRANGER"), REASON_CALLING_AE)
    # the same through a real modality stack
    res = echoscu(env.server.port, calling="STRANGER2")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr, res.stderr
    for ae in ("STRANGER", "STRANGER2"):
        found = rejected_events(env.vault, ae)
        assert found, f"no rejection recorded for {ae}"
        ev = found[0]
        assert ev["code"] == "110113" and ev["outcome"] == "minor_failure"
        assert ev["called_ae"] == AE and ev["tls"] is False
        assert "not a registered node" in str(ev["message"])


def test_wrong_host_is_rejected_and_recorded(env: Env) -> None:
    # REMOTE2 is registered at 127.0.0.2: from 127.0.0.1 it is someone else
    assert_rejected(associate(env.server.port, calling=REMOTE), REASON_CALLING_AE)
    found = rejected_events(env.vault, REMOTE, LOCAL)
    assert found and "registered for host 127.0.0.2" in str(found[0]["message"])
    assert "came from another address" in str(found[0]["message"])
    # from its own address it is accepted
    assert_echo_ok(associate(env.server.port, calling=REMOTE, source=OTHER))
    assert not rejected_events(env.vault, REMOTE, OTHER, timeout=0)


def test_wrong_called_ae_is_rejected_and_recorded(env: Env) -> None:
    assert_rejected(
        associate(env.server.port, calling=MODALITY, called="NOTTHISONE"), REASON_CALLED_AE
    )
    found = wait_events(
        env.vault, "dicom.association.rejected",
        lambda e: e["ae"] == MODALITY and e["called_ae"] == "NOTTHISONE",
    )
    assert found and "called AE" in str(found[0]["message"])
    # the same node calling the right AE is fine
    assert_echo_ok(associate(env.server.port, calling=MODALITY))


def test_tls_only_node_on_plain_port_is_rejected_and_recorded(env: Env) -> None:
    assert_rejected(associate(env.server.port, calling=TLSONLY), REASON_NO_REASON)
    found = rejected_events(env.vault, TLSONLY)
    assert found and found[0]["tls"] is False and "TLS only" in str(found[0]["message"])
    # on the TLS port (anonymous client) it is accepted
    res = echoscu(env.server.tls_port, calling=TLSONLY, tls=("+tla", "+cf", str(env.ca)))
    assert res.returncode == 0, res.stdout + res.stderr


def test_removed_node_is_refused_without_restart(env: Env) -> None:
    assert_echo_ok(associate(env.server.port, calling=GOING))
    assert not rejected_events(env.vault, GOING, timeout=0)
    env.vault.cli("node", "remove", GOING)
    assert_rejected(associate(env.server.port, calling=GOING), REASON_CALLING_AE)
    assert rejected_events(env.vault, GOING)
    assert env.server.alive()


def test_node_without_store_role_can_echo_but_not_store(env: Env) -> None:
    assert_echo_ok(associate(env.server.port, calling=QUERYONLY))
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    assoc = associate(
        env.server.port, calling=QUERYONLY,
        contexts=[(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)],
    )
    try:
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assert status is not None and status.Status == STATUS_NOT_AUTHORIZED
    finally:
        if assoc.is_established:
            assoc.release()
    found = wait_events(env.vault, "dicom.store.refused", lambda e: e["ae"] == QUERYONLY)
    assert found and found[0]["code"] == "110113" and found[0]["address"] == LOCAL
    # the association summary counts it as refused, and nothing was archived
    summary = wait_events(env.vault, "dicom.store.association", lambda e: e["ae"] == QUERYONLY)
    assert summary and summary[0]["refused"] == 1 and summary[0]["study_uids"] == []
    assert not any(k in summary[0] for k in ("stored", "duplicate", "conflict"))


# --- TLS port -----------------------------------------------------------------------------


def test_tls_port_refuses_plaintext(env: Env) -> None:
    before = handshake_failures(env.vault, "WRONG_VERSION_NUMBER")
    rejected_before = len(rejected_events(env.vault, TLSONLY, timeout=0))
    res = echoscu(env.server.tls_port, calling=TLSONLY)
    assert res.returncode != 0, res.stdout
    assoc = associate(env.server.tls_port, calling=TLSONLY)
    assert not assoc.is_established and not assoc.is_rejected
    # both refused at the TLS layer and recorded; no association was examined
    assert wait_handshake_failures(env.vault, "WRONG_VERSION_NUMBER", before + 2) == before + 2
    assert len(rejected_events(env.vault, TLSONLY, timeout=0)) == rejected_before


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1],
                         ids=["tls1.0", "tls1.1"])
def test_tls_port_refuses_old_tls(env: Env, version: ssl.TLSVersion) -> None:
    # With Python's ssl module: a client that offers only this old version. The server
    # answers with a protocol_version alert. If the local OpenSSL cannot even offer the
    # version (a build without TLS 1.0/1.1), the handshake fails on our side with another
    # error; the raw ClientHello below then shows the server's refusal regardless of the
    # local OpenSSL.
    before = handshake_failures(env.vault, "UNSUPPORTED_PROTOCOL")
    ctx = client_context(None, min_v=ssl.TLSVersion.TLSv1, max_v=version, weak=True)
    with pytest.raises((ssl.SSLError, ConnectionError)) as failure:
        tls_handshake(env.server.tls_port, ctx)
    text = str(failure.value)
    local_cannot_offer = "NO_PROTOCOLS_AVAILABLE" in text or "UNSUPPORTED_PROTOCOL" in text
    assert local_cannot_offer or "ALERT_PROTOCOL_VERSION" in text or isinstance(
        failure.value, ConnectionError
    ), text

    # With a hand-built ClientHello for that version: the server answers with a fatal
    # protocol_version alert (or closes), never with a ServerHello.
    wire = {ssl.TLSVersion.TLSv1: 0x0301, ssl.TLSVersion.TLSv1_1: 0x0302}[version]
    cbc_suites = [0xC009, 0xC00A, 0xC013, 0xC014, 0x002F, 0x0035]
    answer = raw_tls_answer(env.server.tls_port, raw_client_hello(wire, cbc_suites))
    assert answer[:1] != b"\x16", "server sent a handshake record (ServerHello)"
    if answer:
        assert answer[0] == 0x15 and answer[5:7] == b"\x02\x46", answer.hex()
    expected = before + (1 if local_cannot_offer else 2)

    openssl = shutil.which("openssl")
    if openssl:
        flag = {ssl.TLSVersion.TLSv1: "-tls1", ssl.TLSVersion.TLSv1_1: "-tls1_1"}[version]
        res = subprocess.run(
            [openssl, "s_client", "-connect", f"{LOCAL}:{env.server.tls_port}", flag,
             "-cipher", "DEFAULT:@SECLEVEL=0"],
            input="", capture_output=True, text=True, timeout=20,
        )
        assert res.returncode != 0, res.stdout
        if "no protocols available" not in res.stdout + res.stderr:
            expected += 1
    # every refusal was recorded by the server
    assert wait_handshake_failures(env.vault, "UNSUPPORTED_PROTOCOL", expected) >= expected


def test_raw_tls12_client_hello_gets_server_hello(env: Env) -> None:
    # Control for the raw ClientHello above: the same builder with TLS 1.2 and AEAD suites
    # is answered with a ServerHello, so the refusals are about the version.
    answer = raw_tls_answer(
        env.server.tls_port, raw_client_hello(0x0303, [0xC02B, 0xC02C, 0xC02F, 0xC030])
    )
    assert answer[:1] == b"\x16" and answer[5:6] == b"\x02", answer.hex()


def test_tls_port_offers_tls12_ecdhe_aead(env: Env) -> None:
    ctx = client_context(env.ca, min_v=ssl.TLSVersion.TLSv1_2, max_v=ssl.TLSVersion.TLSv1_2)
    version, cipher = tls_handshake(env.server.tls_port, ctx)
    assert version == "TLSv1.2"
    assert cipher is not None and cipher.startswith("ECDHE-"), cipher
    assert "GCM" in cipher or "CHACHA20-POLY1305" in cipher, cipher


def test_tls12_refuses_non_forward_secret_or_cbc_suites(env: Env) -> None:
    ctx = client_context(None, min_v=ssl.TLSVersion.TLSv1_2, max_v=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384:ECDHE-ECDSA-AES128-SHA:"
                    "ECDHE-RSA-AES128-SHA")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_handshake(env.server.tls_port, ctx)


def test_tls_port_offers_tls13(env: Env) -> None:
    ctx = client_context(env.ca, min_v=ssl.TLSVersion.TLSv1_3, max_v=ssl.TLSVersion.TLSv1_3)
    version, cipher = tls_handshake(env.server.tls_port, ctx)
    assert version == "TLSv1.3"
    assert cipher in {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                      "TLS_CHACHA20_POLY1305_SHA256"}, cipher


# --- client certificates ------------------------------------------------------------------


def test_client_cert_node_without_certificate_is_refused(env: Env) -> None:
    res = echoscu(env.server.tls_port, calling=CERTMOD, tls=("+tla", "+cf", str(env.ca)))
    assert res.returncode != 0, res.stdout
    found = rejected_events(env.vault, CERTMOD)
    assert found and found[0]["tls"] is True
    assert "client certificate" in str(found[0]["message"])
    # the exact A-ASSOCIATE-RJ, through pynetdicom
    ctx = client_context(env.ca, min_v=ssl.TLSVersion.TLSv1_2, max_v=ssl.TLSVersion.TLSv1_3)
    assert_rejected(associate(env.server.tls_port, calling=CERTMOD, tls=ctx),
                    REASON_NO_REASON)


def test_client_cert_node_with_its_certificate_is_accepted(env: Env) -> None:
    tls = ("+tls", str(env.certs / f"{CERTMOD}.key"), str(env.certs / f"{CERTMOD}.crt"),
           "-pw", "+cf", str(env.ca))
    res = echoscu(env.server.tls_port, calling=CERTMOD, tls=tls)
    assert res.returncode == 0, res.stdout + res.stderr


def test_client_cert_from_another_ca_fails_the_handshake(env: Env) -> None:
    key, cert = foreign_client_cert(env.root / "foreign", CERTMOD)
    before = handshake_failures(env.vault, "CERTIFICATE_VERIFY_FAILED")
    rejected_before = len(rejected_events(env.vault, CERTMOD, timeout=0))
    res = echoscu(env.server.tls_port, calling=CERTMOD,
                  tls=("+tls", str(key), str(cert), "-pw", "+cf", str(env.ca)))
    assert res.returncode != 0, res.stdout
    assert wait_handshake_failures(
        env.vault, "CERTIFICATE_VERIFY_FAILED", before + 1
    ) == before + 1
    # refused at the TLS layer: no association was ever examined
    assert len(rejected_events(env.vault, CERTMOD, timeout=0)) == rejected_before


# --- untrusted source address -------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that trusts 127.0.0.1 only."""
    with served_vault(tmp_path_factory.mktemp("narrow") / "v",
                      settings={"dicom": {"trusted_networks": '["127.0.0.1/32"]'}},
                      nodes=[(MODALITY, (), LOCAL), (REMOTE, (), OTHER)]) as served:
        yield served.server


def test_untrusted_source_is_dropped_before_dicom_and_raises_exposure(narrow: Server) -> None:
    vault = narrow.vault
    # Nothing is read or answered: a bare connection is closed without a byte.
    with socket.create_connection((LOCAL, narrow.port), timeout=10,
                                  source_address=(OTHER, 0)) as s, \
            contextlib.suppress(ConnectionResetError):
        assert s.recv(1) == b""
    # A registered node at that address does not get an association either (no RJ).
    assoc = associate(narrow.port, calling=REMOTE, source=OTHER)
    assert not assoc.is_established and not assoc.is_rejected
    assert not events(vault, "dicom.association.rejected")

    found = wait_events(vault, "exposure", lambda e: e["address"] == OTHER, count=2)
    assert len(found) >= 2
    ev = found[0]
    assert ev["code"] == "110113" and ev["outcome"] == "major_failure"
    assert ev["port"] == "plain"
    assert "reachable from outside the practice network" in narrow.log()

    # from the trusted address, a registered node works as usual
    assert_echo_ok(associate(narrow.port, calling=MODALITY))
    assert all(e["address"] == OTHER for e in events(vault, "exposure"))
