"""Issue 11, defect 9: a node's client certificate is bound to that node.

Attacks reproduced against the real server (dcmtk and pynetdicom peers, loopback only):
node A's certificate used by calling AE B, the server's own certificate presented as a
client certificate, a revoked certificate used while the server keeps running. Also the
certificates themselves: node certificates are client-auth only, the CA carries critical
name constraints, and the server certificate still verifies under it (OpenSSL).
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.helpers import AE as SERVER_AE
from tests.helpers import Server, VaultDir, echoscu, events, pv, start_server, wait_events

pytestmark = pytest.mark.slow
LOCAL = "127.0.0.1"


@dataclass
class Env:
    vault: VaultDir
    server: Server
    certs: Path

    @property
    def ca(self) -> Path:
        return self.vault.data / "tls" / "ca.crt"

    def tls(self, ae: str) -> tuple[str, ...]:
        return ("+tls", str(self.certs / f"{ae}.key"), str(self.certs / f"{ae}.crt"), "-pw",
                "+cf", str(self.ca))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("nodecerts") / "v"
    root.mkdir()
    # No web sign-in here: the first-run secrets are not needed.
    key = root / "keys" / "master.key"
    pv("init", "--data", root / "data", "--key-file", key, "--ae-title", SERVER_AE)
    vault = VaultDir(root, key, "")
    certs = root / "certs"
    # One node through the CLI as an administrator would; the others in one vault opening
    # with the same calls (each CLI run costs seconds on a loaded machine).
    vault.add_node("NODEA", "--client-cert")
    vault.cli("node", "cert", "NODEA", "--out", certs)
    _add_nodes_in_process(vault, ["NODEB", "NODEC", "CT.ROOM1"], certs)
    server = start_server(vault)
    try:
        yield Env(vault, server, certs)
    finally:
        server.stop()


def _add_nodes_in_process(vault: VaultDir, names: list[str], certs: Path | None) -> None:
    """``node add AE --host 127.0.0.1 --client-cert`` (+ ``node cert AE --out certs``)."""
    from pacsvault.crypto.tls import issue_node

    v = vault.open()
    try:
        for ae in names:
            v.nodes.add(ae, LOCAL, tls=True, client_cert=True)
            if certs is not None:
                issued = issue_node(v.layout.tls, v.tls_password(), ae, LOCAL, certs)
                v.nodes.record_certificates(ae, issued)
    finally:
        v.close()


def _rejections(env: Env, ae: str) -> list[dict[str, object]]:
    return [e for e in events(env.vault, "dicom.association.rejected") if e["ae"] == ae]


def _echo_with_context(env: Env, calling: str, ctx: ssl.SSLContext) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 15
    assoc = ae.associate(LOCAL, env.server.tls_port, ae_title=SERVER_AE, tls_args=(ctx, LOCAL))
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def _plain_key(env: Env, name: str, out: Path) -> Path:
    """One of the vault's own keys (stored encrypted) as plain PEM, for the attacker role."""
    v = env.vault.open()
    try:
        key = serialization.load_pem_private_key(
            (env.vault.data / "tls" / name).read_bytes(), v.tls_password())
    finally:
        v.close()
    out.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return out


def test_own_certificate_accepted(env: Env) -> None:
    for ae in ("NODEA", "CT.ROOM1"):  # a dotted AE title is not taken for a host name
        res = echoscu(env.server.tls_port, calling=ae, tls=env.tls(ae))
        assert res.returncode == 0, res.stdout + res.stderr


def test_other_nodes_certificate_refused_and_recorded(env: Env) -> None:
    res = echoscu(env.server.tls_port, calling="NODEB", tls=env.tls("NODEA"))
    assert res.returncode != 0
    assert "Rejected" in res.stdout + res.stderr or "reject" in (res.stdout + res.stderr).lower()
    found = _rejections(env, "NODEB")
    assert found, "no audit record of the refused certificate"
    assert any("another node" in str(e["message"]) for e in found), found


def test_server_certificate_refused_as_client_certificate(env: Env, tmp_path: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(env.ca))
    ctx.load_cert_chain(env.vault.data / "tls" / "server.crt",
                        _plain_key(env, "server.key.enc", tmp_path / "server.key"))
    before = len(events(env.vault, "dicom.tls.handshake_failed"))
    assert not _echo_with_context(env, "NODEA", ctx)
    assert not _echo_with_context(env, SERVER_AE, ctx)
    # Refused by the TLS layer itself (purpose: TLS client), before any DICOM byte. The
    # server records it after the client has seen the refusal: polled (it failed once in a
    # parallel run reading at once).
    failed = wait_events(env.vault, "dicom.tls.handshake_failed", count=before + 2)
    assert len(failed) >= before + 2


def test_vault_outbound_certificate_refused_for_a_node(env: Env, tmp_path: Path) -> None:
    """The certificate the vault presents on its own C-MOVE calls is no node's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(env.ca))
    ctx.load_cert_chain(env.vault.data / "tls" / "client.crt",
                        _plain_key(env, "client.key.enc", tmp_path / "client.key"))
    assert not _echo_with_context(env, "NODEA", ctx)


def test_revocation_applies_without_restart(env: Env) -> None:
    assert echoscu(env.server.tls_port, calling="NODEC", tls=env.tls("NODEC")).returncode == 0
    serial = x509.load_pem_x509_certificate(
        (env.certs / "NODEC.crt").read_bytes()).serial_number
    env.vault.cli("node", "cert", "NODEC", "--revoke")
    res = echoscu(env.server.tls_port, calling="NODEC", tls=env.tls("NODEC"))
    assert res.returncode != 0, "revoked certificate still accepted"
    assert any("revoked" in str(e["message"]) for e in _rejections(env, "NODEC"))
    assert env.server.alive()
    # The CRL is public, signed by the CA, and lists the serial.
    crl = x509.load_pem_x509_crl((env.vault.data / "tls" / "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate(env.ca.read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    # OpenSSL agrees with a CRL check.
    proc = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CAfile", str(env.ca),
         "-CRLfile", str(env.vault.data / "tls" / "crl.pem"), str(env.certs / "NODEC.crt")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "revoked" in proc.stdout + proc.stderr


def test_certificate_profiles(env: Env) -> None:
    ca = x509.load_pem_x509_certificate(env.ca.read_bytes())
    nc = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    permitted = nc.value.permitted_subtrees or []
    dns = {g.value for g in permitted if isinstance(g, x509.DNSName)}
    assert "localhost" in dns and not any(d in ("", "com", "fr") for d in dns)
    assert any(isinstance(g, x509.IPAddress) for g in permitted)

    node = x509.load_pem_x509_certificate((env.certs / "NODEA.crt").read_bytes())
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = node.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign
    cn = node.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "NODEA"
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:pacsvault:node:NODEA"]
    days = (node.not_valid_after_utc - node.not_valid_before_utc).days
    assert days <= 731

    server = x509.load_pem_x509_certificate((env.vault.data / "tls" / "server.crt").read_bytes())
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "verify", "-CAfile", str(env.ca), *args],
                              capture_output=True, text=True, timeout=30)

    assert verify("-purpose", "sslserver",
                  str(env.vault.data / "tls" / "server.crt")).returncode == 0
    assert verify("-purpose", "sslclient", str(env.certs / "NODEA.crt")).returncode == 0
    assert verify("-purpose", "sslserver", str(env.certs / "NODEA.crt")).returncode != 0


def test_name_constraints_refuse_a_foreign_name(env: Env, tmp_path: Path) -> None:
    """A certificate the CA key would sign for a bank's domain does not verify."""
    from pacsvault.crypto import tls

    v = env.vault.open()
    try:
        cert_pem, _ = tls.issue(v.layout.tls, v.tls_password(), "www.bank.example",
                                [x509.DNSName("www.bank.example")],
                                eku=[ExtendedKeyUsageOID.SERVER_AUTH], encrypt_key=False)
    finally:
        v.close()
    (tmp_path / "bank.crt").write_bytes(cert_pem)
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(env.ca), str(tmp_path / "bank.crt")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "permitted subtree violation" in proc.stdout + proc.stderr


def test_removing_a_node_revokes_its_certificates(env: Env, tmp_path: Path) -> None:
    _add_nodes_in_process(env.vault, ["GONE"], tmp_path)
    serial = x509.load_pem_x509_certificate((tmp_path / "GONE.crt").read_bytes()).serial_number
    env.vault.cli("node", "remove", "GONE")
    crl = x509.load_pem_x509_crl((env.vault.data / "tls" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


def _https_server(cert: Path, key: Path) -> tuple[object, int]:
    """A bare HTTPS server on loopback presenting ``cert``."""
    import http.server
    import threading

    httpd = http.server.HTTPServer((LOCAL, 0), http.server.SimpleHTTPRequestHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, int(httpd.server_address[1])


def test_chromium_trusts_the_constrained_ca_for_the_server_only(env: Env, tmp_path: Path) -> None:
    """Chromium with the vault CA installed (an NSS database, as on a practice PC): the
    server's HTTPS certificate is accepted; a certificate the same CA signs for a foreign
    name is refused because of the name constraints."""
    import shutil

    from tests.browser import CHROMIUM, CHROMIUM_ARGS, chromium_available

    if not chromium_available() or shutil.which("certutil") is None:
        pytest.skip("needs Debian's chromium and certutil (libnss3-tools)")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from pacsvault.crypto import tls

    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["certutil", "-A", "-d", f"sql:{nssdb}", "-n", "pacsvault", "-t", "C,,",
                    "-i", str(env.ca)], check=True, capture_output=True, timeout=30)
    v = env.vault.open()
    try:
        cert_pem, key_pem = tls.issue(
            v.layout.tls, v.tls_password(), "www.bank.example",
            [x509.DNSName("www.bank.example"), x509.IPAddress(__import__("ipaddress")
                                                              .ip_address(LOCAL))],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH], encrypt_key=False)
    finally:
        v.close()
    (tmp_path / "bank.crt").write_bytes(cert_pem)
    (tmp_path / "bank.key").write_bytes(key_pem)
    bank, bank_port = _https_server(tmp_path / "bank.crt", tmp_path / "bank.key")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, env={"HOME": str(home)},
                args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP www.bank.example 127.0.0.1"])
            try:
                context = browser.new_context(ignore_https_errors=False)
                page = context.new_page()
                page.set_default_timeout(30_000)
                for host in ("127.0.0.1", "localhost"):
                    response = page.goto(f"https://{host}:{env.server.https_port}/login")
                    assert response is not None and response.status < 500, host
                for url in (f"https://www.bank.example:{bank_port}/",
                            f"https://127.0.0.1:{bank_port}/"):
                    with pytest.raises(PlaywrightError, match="ERR_CERT") as refused:
                        page.goto(url)
                    # trusted CA, refused name: not an "unknown authority" error
                    assert "AUTHORITY_INVALID" not in str(refused.value), refused.value
            finally:
                browser.close()
    finally:
        bank.shutdown()  # type: ignore[attr-defined]


def test_vault_made_before_node_binding_opens_and_catches_up(tmp_path: Path) -> None:
    """An older vault: CA without name constraints, no client.crt, no CRL, no
    node_certificates table. It opens, gains the missing parts, and ``status`` says the CA
    is unconstrained."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from sqlalchemy import text

    root = tmp_path / "old"
    key = root / "keys" / "master.key"
    pv("init", "--data", root / "data", "--key-file", key, "--ae-title", SERVER_AE)
    vault = VaultDir(root, key, "")
    tls_dir = vault.data / "tls"
    v = vault.open()
    try:
        with v.engine.begin() as conn:
            conn.execute(text("DROP TABLE node_certificates"))
            conn.execute(text("DROP TABLE alembic_version"))  # from before versions
        ca = x509.load_pem_x509_certificate((tls_dir / "ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((tls_dir / "ca.key.enc").read_bytes(),
                                                    v.tls_password())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        old = x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject) \
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number()) \
            .not_valid_before(ca.not_valid_before_utc) \
            .not_valid_after(ca.not_valid_before_utc + dt.timedelta(days=3650))
        for ext in ca.extensions:
            if not isinstance(ext.value, x509.NameConstraints):
                old = old.add_extension(ext.value, ext.critical)
        (tls_dir / "ca.crt").write_bytes(old.sign(ca_key, hashes.SHA256())
                                         .public_bytes(serialization.Encoding.PEM))
    finally:
        v.close()
    for name in ("client.crt", "client.key.enc", "crl.pem"):
        (tls_dir / name).unlink()

    out = vault.cli("status").stdout
    assert "CA without name constraints" in out
    assert (tls_dir / "client.crt").exists() and (tls_dir / "crl.pem").exists()
    _add_nodes_in_process(vault, ["LATE"], None)
    vault.cli("node", "cert", "LATE", "--out", tmp_path / "certs")
    vault.cli("node", "cert", "LATE", "--revoke")
    crl = x509.load_pem_x509_crl((tls_dir / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificate(
        (tmp_path / "certs" / "LATE.crt").read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None

    # The way out: a new, constrained CA (asks for --yes; old files kept aside).
    assert vault.cli("tls", "rotate-ca", check=False).returncode != 0
    vault.cli("tls", "rotate-ca", "--yes")
    assert "CA without name constraints" not in vault.cli("status").stdout
    assert list(tls_dir.glob("retired-*/ca.key.enc"))
    new_ca = x509.load_pem_x509_certificate((tls_dir / "ca.crt").read_bytes())
    assert new_ca.extensions.get_extension_for_class(x509.NameConstraints).critical

    def verify(cert: Path) -> int:
        return subprocess.run(["openssl", "verify", "-CAfile", str(tls_dir / "ca.crt"),
                               str(cert)], capture_output=True, timeout=30).returncode

    assert verify(tls_dir / "server.crt") == 0 and verify(tls_dir / "client.crt") == 0
    assert verify(tmp_path / "certs" / "LATE.crt") != 0  # re-issue needed, as announced
