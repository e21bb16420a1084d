"""Issue 18, security check, TLS section: handshake probes against the real listeners."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pacsvault.check import CheckContext, CheckResult, Severity, run, tls, tlsprobe
from pacsvault.crypto.tls_context import TEST_ONLY_TLS11_ENV, TEST_ONLY_TLS11_VALUE
from tests.harness.served import Served, served_vault

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served_vault(tmp_path_factory.mktemp("checktls") / "v") as found:
        yield found


def tls_check(served: Served) -> CheckResult:
    vault = served.vault.open()
    try:
        return run(CheckContext(vault, dt.datetime.now(dt.UTC)), ("tls",))
    finally:
        vault.close()


def test_fresh_server_offers_only_tls12_and_13_and_has_no_tls_finding(served: Served) -> None:
    result = tls_check(served)
    assert not result.errors and result.findings == () and result.exit_code == 0
    # what the check saw, asked again of the HTTPS port (the DICOM one holds a per-source
    # slot for a while after each handshake: the check above used its share)
    seen = tlsprobe.probe("https", "127.0.0.1", served.server.https_port)
    assert set(seen.protocols) == {"TLSv1.2", "TLSv1.3"}, seen
    assert seen.weak == {} and seen.inconclusive == [] and seen.error == ""
    assert {"ECDSA", "RSA"} <= set(seen.certificates)


@pytest.mark.slow
def test_listener_forced_to_accept_tls11_is_critical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_ONLY_TLS11_ENV, TEST_ONLY_TLS11_VALUE)  # the server inherits it
    legacy = ("OLDCT", ("--tls", "--tls-profile", "legacy-aes"), "192.168.1.50")
    with served_vault(tmp_path / "v", nodes=[legacy]) as weak_served:
        monkeypatch.delenv(TEST_ONLY_TLS11_ENV)  # this process's probes stay as they are
        weakened = weak_served.server
        result = tls_check(weak_served)
    assert TEST_ONLY_TLS11_ENV in weakened.log()  # said loudly at start
    obsolete = [f for f in result.findings if f.id == "tls.obsolete-protocol"]
    assert {f.data["port"] for f in obsolete} == {weakened.tls_port, weakened.https_port}
    assert all(f.severity is Severity.CRITICAL and "TLSv1.1" in f.evidence.en for f in obsolete)
    assert all("ANSSI" in f.requirement and "GDPR art. 32" in f.requirement for f in obsolete)
    assert "TLSv1" not in obsolete[0].data["protocols"]  # only what was really negotiated
    weak = [f for f in result.findings if f.id == "tls.weak-suites"]
    assert weak and all("CBC mode" in f.data["weak_suites"] for f in weak)
    assert result.exit_code == 2
    old_node = next(f for f in result.findings if f.id == "tls.legacy-profile-nodes")
    assert old_node.severity is Severity.WARNING
    assert old_node.data["nodes"] == [{"ae_title": "OLDCT", "host": "192.168.1.50"}]


def _certificate(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                 not_after: dt.datetime) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(not_after - dt.timedelta(days=400)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def test_certificate_expiry_and_key_strength() -> None:
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505  (the weak key under test)
    soon = tls.certificate_findings("HTTPS", _certificate(weak_rsa, NOW + dt.timedelta(days=10)),
                                    NOW)
    assert {(f.id, f.severity) for f in soon} == {
        ("tls.certificate-expiring", Severity.WARNING), ("tls.weak-key", Severity.CRITICAL)}
    assert "RSA 1024 bits" in next(f for f in soon if f.id == "tls.weak-key").evidence.en
    p224 = ec.generate_private_key(ec.SECP224R1())
    expired = tls.certificate_findings("DICOM TLS", _certificate(
        p224, NOW - dt.timedelta(days=1)), NOW)
    assert {(f.id, f.severity) for f in expired} == {
        ("tls.certificate-expired", Severity.CRITICAL), ("tls.weak-key", Severity.CRITICAL)}
    good = ec.generate_private_key(ec.SECP256R1())
    assert tls.certificate_findings("x", _certificate(good, NOW + dt.timedelta(days=90)),
                                    NOW) == []


def test_no_running_server_reads_the_files_and_says_so(served: Served, tmp_path: Path) -> None:
    vault = served.vault.open()
    try:
        ctx = CheckContext(vault, NOW + dt.timedelta(days=3650))  # the files, ten years on
        findings = tls._offline(ctx)
    finally:
        vault.close()
    ids = [f.id for f in findings]
    assert ids[0] == "tls.not-probed" and findings[0].severity is Severity.INFO
    assert "tls.certificate-expired" in ids
