"""DICOM TLS profiles real modalities speak (issue 13, defect 7).

* BCP 195 with an RSA server certificate: a client whose TLS stack knows only ECDHE-RSA
  (dcmtk ``echoscu`` forced to one suite, and Python's ssl) completes the handshake; the
  ECDSA certificate is still what an ECDSA-capable client gets.
* The retired "AES TLS Secure Transport Connection Profile" (TLS_RSA_WITH_AES_128_CBC_SHA,
  dcmtk ``+pa``) only for the node opted in with ``--tls-profile legacy-aes``: the handshake
  is allowed only from that node's address, and the association only for that node's AE
  title; every other source and node keeps the strict profile.
* The strict profile still refuses TLS 1.0/1.1.

dcmtk's echoscu cannot choose its source address, so the opted-in node is registered at
127.0.0.1 and the "other" address 127.0.0.2 is exercised with Python's ssl client.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.harness.served import Served, served_vault
from tests.helpers import VaultDir, echoscu, events, make_vault, storescu
from tests.web_helpers import client, sign_in

pytestmark = pytest.mark.slow
LOCAL = "127.0.0.1"
OTHER = "127.0.0.2"
LEGACY = "OLDCT"  # opted in, at 127.0.0.1
MODERN = "NEWMR"  # TLS node at 127.0.0.1, strict profile
REMOTE = "REMOTE2"  # TLS node at 127.0.0.2, strict profile
ADMIN, ADMIN_PW = "chef.tls", "phare-des-baleines-en-hiver"


Env = Served


def _add_admin(vault: VaultDir) -> None:
    v = vault.open()
    try:
        v.accounts.add_user(ADMIN, ["admin"], ADMIN_PW, by="test")
    finally:
        v.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with served_vault(tmp_path_factory.mktemp("tlsprofiles") / "v", nodes=[
        (LEGACY, ("--tls", "--tls-profile", "legacy-aes"), LOCAL),
        (MODERN, ("--tls",), LOCAL),
        (REMOTE, ("--tls",), OTHER),
    ], prepare=_add_admin) as served:
        yield served


def _handshake(env: Env, ctx: ssl.SSLContext, source: str = LOCAL) -> ssl.SSLSocket:
    raw = socket.create_connection((LOCAL, env.server.tls_port), timeout=15,
                                   source_address=(source, 0))
    try:
        return ctx.wrap_socket(raw, server_hostname=LOCAL)
    except BaseException:
        raw.close()
        raise


def _client(ciphers: str, *, legacy: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers + (":@SECLEVEL=0" if legacy else ""))
    return ctx


def test_rsa_only_client_gets_the_rsa_certificate(env: Env) -> None:
    ctx = _client("ECDHE-RSA-AES128-GCM-SHA256")
    ctx.load_verify_locations(cafile=str(env.ca))
    with _handshake(env, ctx) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
        assert (tls.cipher() or ("",))[0] == "ECDHE-RSA-AES128-GCM-SHA256"
    # an ECDSA-capable client still gets the ECDSA certificate
    ctx = _client("ECDHE-ECDSA-AES128-GCM-SHA256")
    ctx.load_verify_locations(cafile=str(env.ca))
    with _handshake(env, ctx) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert not isinstance(x509.load_der_x509_certificate(der).public_key(),
                              rsa.RSAPublicKey)


def test_dcmtk_echoscu_with_an_rsa_suite(env: Env) -> None:
    # +pn (no profile suites of its own) + one ECDHE-RSA suite: an RSA-only TLS stack
    res = echoscu(env.server.tls_port, calling=MODERN,
                  tls=("+tla", "+cf", str(env.ca), "+pn",
                       "+cs", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"))
    assert res.returncode == 0, res.stdout + res.stderr
    accepted = [e for e in events(env.vault, "dicom.association.accepted")
                if e["ae"] == MODERN]
    # an ECDHE-RSA suite can only be negotiated with the RSA certificate
    assert accepted and accepted[-1].get("cipher") == "ECDHE-RSA-AES128-GCM-SHA256"


def test_legacy_aes_profile_for_the_opted_in_node(env: Env) -> None:
    res = echoscu(env.server.tls_port, calling=LEGACY,
                  tls=("+tla", "+cf", str(env.ca), "+pa"))
    assert res.returncode == 0, res.stdout + res.stderr
    accepted = [e for e in events(env.vault, "dicom.association.accepted")
                if e["ae"] == LEGACY]
    assert accepted and accepted[-1].get("cipher") == "AES128-SHA"


def test_legacy_aes_refused_for_another_node_at_the_same_address(env: Env) -> None:
    # The handshake succeeds (the address is the opted-in node's); the association of a
    # node without the opt-in is rejected and recorded.
    res = echoscu(env.server.tls_port, calling=MODERN,
                  tls=("+tla", "+cf", str(env.ca), "+pa"))
    assert res.returncode != 0, res.stdout + res.stderr
    found = [e for e in events(env.vault, "dicom.association.rejected")
             if e["ae"] == MODERN]
    assert found and "legacy" in str(found[-1]["message"])


def test_legacy_aes_handshake_refused_from_any_other_address(env: Env) -> None:
    ctx = _client("AES128-SHA", legacy=True)
    ctx.load_verify_locations(cafile=str(env.ca))
    with pytest.raises(ssl.SSLError):
        _handshake(env, ctx, source=OTHER).close()
    # the same address still speaks the strict profile
    ctx = _client("ECDHE-RSA-AES128-GCM-SHA256")
    ctx.load_verify_locations(cafile=str(env.ca))
    _handshake(env, ctx, source=OTHER).close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_strict_and_legacy_refuse_old_tls(env: Env, version: ssl.TLSVersion) -> None:
    for source in (OTHER, LOCAL):  # strict context, then the opted-in address's
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = version
        with pytest.raises(ssl.SSLError) as info:
            _handshake(env, ctx, source=source).close()
        # refused by the server (protocol version alert), not by our own client
        assert "VERSION" in str(info.value).upper(), str(info.value)


def test_opt_in_listed_and_recorded(env: Env) -> None:
    out = env.vault.cli("node", "list").stdout
    line = next(li for li in out.splitlines() if li.startswith(LEGACY))
    assert "legacy-aes" in line
    assert "legacy-aes" not in next(li for li in out.splitlines() if li.startswith(MODERN))
    found = [e for e in events(env.vault, "node.tls_profile") if e.get("node") == LEGACY]
    assert found and found[-1].get("profile") == "legacy-aes"
    status = env.vault.cli("status").stdout
    assert any(line.startswith("Warning") and LEGACY in line and "AES" in line
               for line in status.splitlines()), status


def test_opt_in_is_a_warning_on_the_health_page(env: Env) -> None:
    with client(env.server.https_port, env.ca) as admin:
        sign_in(admin, ADMIN, ADMIN_PW)
        page = admin.get("/admin/health")
        assert page.status_code == 200
        warnings = [line for line in page.text.splitlines() if "legacy-tls" in line]
        assert len(warnings) == 1 and LEGACY in warnings[0] and MODERN not in warnings[0]
        french = admin.get("/admin/health", headers={"accept-language": "fr"})
        assert "ancien profil TLS AES" in french.text


def test_opt_in_needs_tls_and_a_known_profile(env: Env) -> None:
    res = env.vault.cli("node", "add", "PLAINOLD", "--host", LOCAL, "--tls-profile",
                        "legacy-aes", check=False)
    assert res.returncode != 0 and "requires --tls" in res.stdout + res.stderr
    res = env.vault.cli("node", "set", MODERN, "--tls-profile", "anything", check=False)
    assert res.returncode != 0


def test_older_vault_gets_rsa_certificate_and_profile_column(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    vault = make_vault(tmp_path_factory.mktemp("oldvault") / "v")
    vault.add_node(MODERN, "--tls")
    tls = vault.data / "tls"
    for name in ("server-rsa.crt", "server-rsa.key.enc"):
        (tls / name).unlink()
    v = vault.open()
    try:
        with v.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE nodes DROP COLUMN tls_profile")
            conn.exec_driver_sql("DROP TABLE alembic_version")  # from before versions
    finally:
        v.close()
    v = vault.open()  # what an upgrade does at open
    try:
        node = v.nodes.get(MODERN)
        assert node is not None and node.tls_profile == "bcp195"
        cert = x509.load_pem_x509_certificate((tls / "server-rsa.crt").read_bytes())
        ecdsa = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
        key = cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
        san = x509.SubjectAlternativeName
        assert cert.extensions.get_extension_for_class(san).value == \
            ecdsa.extensions.get_extension_for_class(san).value
        assert cert.subject == ecdsa.subject
        assert b"ENCRYPTED PRIVATE KEY" in (tls / "server-rsa.key.enc").read_bytes()
        assert (tls / "server-rsa.key.enc").stat().st_mode & 0o077 == 0
    finally:
        v.close()


def test_readme_storescu_compressed_needs_the_matching_proposal(env: Env) -> None:
    """README (issue 13, defect 8): storescu proposes only uncompressed syntaxes, so a JPEG
    2000 file fails without ``-xv`` (``-R`` does not help) and is stored with it."""
    from pydicom.data import get_testdata_file

    j2k = get_testdata_file("MR_small_jp2klossless.dcm")
    assert j2k is not None
    tls = ("+tla", "+cf", str(env.ca))
    res = storescu(env.server.tls_port, [Path(str(j2k))], calling=MODERN, tls=tls,
                   extra=("-R",))
    assert res.returncode != 0 and "Store Failed" in res.stdout + res.stderr
    res = storescu(env.server.tls_port, [Path(str(j2k))], calling=MODERN, tls=tls,
                   extra=("-xv",))
    assert res.returncode == 0, res.stdout + res.stderr


def test_set_opt_in_applies_without_restart_and_is_withdrawn(env: Env) -> None:
    legacy = _client("AES128-SHA", legacy=True)
    legacy.load_verify_locations(cafile=str(env.ca))
    env.vault.cli("node", "set", REMOTE, "--tls-profile", "legacy-aes")
    try:
        with _handshake(env, legacy, source=OTHER) as tls:
            assert (tls.cipher() or ("",))[0] == "AES128-SHA"
    finally:
        env.vault.cli("node", "set", REMOTE, "--tls-profile", "bcp195")
    with pytest.raises(ssl.SSLError):
        _handshake(env, legacy, source=OTHER).close()
    found = [e.get("profile") for e in events(env.vault, "node.tls_profile")
             if e.get("node") == REMOTE]
    assert found == ["legacy-aes", "bcp195"]
