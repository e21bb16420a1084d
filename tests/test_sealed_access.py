"""Sealed mode (issue 14, item 3), who may do what while sealed: the /unseal page (CSRF,
throttle, passphrase, "Try again"), the signed node snapshot, the listener TLS boot copy
and client certificates. Real server subprocess and peers, as in test_sealed.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsvault.vault import Vault
from tests import corpus
from tests.helpers import VaultDir, events, start_server, storescu
from tests.test_sealed import (
    MODALITY,
    _qr_status,
    _seal,
    _stored_ok,
    _study_identifier,
    _unseal,
    _vault,
)

pytestmark = pytest.mark.slow


def test_passphrase_key_unsealed_from_the_page_with_csrf_and_throttle(tmp_path: Path) -> None:
    """A passphrase-protected key and no passphrase at start: sealed. The /unseal page
    needs its CSRF token, throttles a source after 5 wrong passphrases (even a right one is
    refused then), and unseals with the right passphrase from another trusted address."""
    from tests.web_helpers import client, csrf_of, write_secret

    vault = _vault(tmp_path / "v")
    vault.set_toml("dicom", "trusted_networks", '["127.0.0.0/8"]')
    passphrase = "velo rouge sur le pont de Nantes a midi"
    pp = write_secret(tmp_path / "pp", passphrase)
    vault.cli("keys", "protect", "--passphrase", "--passphrase-file", pp)
    files = corpus.synthetic_ct_series(tmp_path / "a", 2, seed=4)
    server = start_server(vault)  # no passphrase anywhere
    try:
        assert "ARCHIVE SEALED" in server.log()
        _stored_ok(storescu(server.port, files, calling=MODALITY), 2)
        ca = vault.data / "tls" / "ca.crt"
        with client(server.https_port, ca) as web:
            token = csrf_of(web.get("/unseal").text)
            for _ in range(5):
                wrong = web.post("/unseal", data={"csrf": token, "passphrase": "not it"})
                assert wrong.status_code == 400, wrong.text
                token = csrf_of(wrong.text)
            blocked = web.post("/unseal", data={"csrf": token, "passphrase": passphrase})
            assert blocked.status_code == 429
            assert web.get("/dicom-web/studies").status_code == 503
        with client(server.https_port, ca, local_address="127.0.0.3") as other:
            token = csrf_of(other.get("/unseal").text)
            done = other.post("/unseal", data={"csrf": token, "passphrase": passphrase})
            assert done.status_code == 303 and done.headers["location"] == "/login", done.text
            assert other.get("/login").status_code == 200
        status, _ = _qr_status(server.port, StudyRootQueryRetrieveInformationModelFind,
                               _study_identifier())
        assert status == 0x0000
    finally:
        server.stop()
    v = Vault.open(vault.data, vault.key, passphrase=lambda: passphrase)
    try:
        assert v.archive.counts()["instances"] == 2
    finally:
        v.close()
    found = [e for e in events_with(vault, passphrase) if e["action"].startswith("sealed.")]
    outcomes = [(e["action"], e["address"], e["outcome"]) for e in found]
    assert sum(1 for a, ad, o in outcomes if a == "sealed.unseal" and ad == "127.0.0.1"
               and o != "success") == 5, outcomes
    assert ("sealed.unseal.page", "127.0.0.1", "minor_failure") in outcomes  # throttled
    assert ("sealed.unseal", "127.0.0.3", "success") in outcomes


def events_with(vault: VaultDir, passphrase: str) -> list[dict[str, Any]]:
    v = Vault.open(vault.data, vault.key, passphrase=lambda: passphrase)
    try:
        return [{"action": r.action, "address": r.actor_address, "outcome": r.outcome}
                for r in v.audit.records()]
    finally:
        v.close()


def test_tampered_node_snapshot_trusts_nobody_while_sealed(tmp_path: Path) -> None:
    """The snapshot is signed: an edited one is not used (every association refused, a
    security alert), rather than letting an edited registry in."""
    vault = _vault(tmp_path / "v")
    snapshot = vault.data / "sealed" / "nodes.json"
    body = json.loads(snapshot.read_text())
    body["nodes"].append({**body["nodes"][0], "ae_title": "INTRUDER"})
    snapshot.write_text(json.dumps(body))
    files = corpus.synthetic_ct_series(tmp_path / "a", 1, seed=5)
    away = _seal(vault)
    server = start_server(vault)
    try:
        assert "does not verify" in server.log()
        assert storescu(server.port, files, calling="INTRUDER").returncode != 0
        assert storescu(server.port, files, calling=MODALITY).returncode != 0
        # the key medium is back: the page's "Try again" button (no passphrase) unseals
        from tests.web_helpers import client, csrf_of

        away.rename(vault.key)
        with client(server.https_port, vault.data / "tls" / "ca.crt") as web:
            token = csrf_of(web.get("/unseal").text)
            done = web.post("/unseal", data={"csrf": token, "retry": "1"})
            assert done.status_code == 303 and done.headers["location"] == "/login"
        _stored_ok(storescu(server.port, files, calling=MODALITY), 1)
    finally:
        server.stop()
    assert "sealed.snapshot" in [e["action"] for e in events(vault)]
    # the next open rewrote a good snapshot
    assert "INTRUDER" not in snapshot.read_text()


def test_without_the_boot_secret_tls_stays_closed_plain_still_receives(
        tmp_path: Path) -> None:
    """The listener keys' boot secret went with the key medium: TLS and HTTPS cannot
    prove the server's identity, so they stay closed; the plain port keeps receiving."""
    vault = _vault(tmp_path / "v")
    files = corpus.synthetic_ct_series(tmp_path / "a", 2, seed=6)
    boot = vault.key.with_name(vault.key.name + ".sealed-tls")
    assert boot.exists() and boot.stat().st_mode & 0o077 == 0
    boot.rename(tmp_path / "boot.away")
    away = _seal(vault)
    server = start_server(vault)
    try:
        assert "boot copy cannot be used" in server.log()
        assert "dicom_tls_port" not in server.ports and "https_port" not in server.ports
        _stored_ok(storescu(server.port, files, calling=MODALITY), 2)
        assert "2 object(s)" in _unseal(vault, away)
    finally:
        server.stop()
    assert boot.exists()  # made again at the unseal's open


def test_tls_and_client_certificates_while_sealed(tmp_path: Path) -> None:
    """The TLS port keeps its identity (the listener keys' boot copy) and the policy its
    certificate checks (serials and revocations from the signed snapshot)."""
    vault = _vault(tmp_path / "v")
    certs = tmp_path / "certs"
    for ae in ("NODEA", "NODEB"):
        vault.add_node(ae, "--client-cert")
        vault.cli("node", "cert", ae, "--out", certs)
    vault.cli("node", "cert", "NODEB", "--revoke")
    ca = vault.data / "tls" / "ca.crt"

    def tls(ae: str) -> tuple[str, ...]:
        return ("+tls", str(certs / f"{ae}.key"), str(certs / f"{ae}.crt"), "-pw",
                "+cf", str(ca))

    files = corpus.synthetic_ct_series(tmp_path / "a", 2, seed=31)
    away = _seal(vault)
    server = start_server(vault)
    try:
        assert "ARCHIVE SEALED" in server.log()
        _stored_ok(storescu(server.tls_port, files, calling="NODEA", tls=tls("NODEA")), 2)
        assert storescu(server.tls_port, files, calling="NODEB",
                        tls=tls("NODEB")).returncode != 0  # revoked
        assert storescu(server.port, files, calling="NODEA").returncode != 0  # TLS only
        assert "2 object(s)" in _unseal(vault, away)
    finally:
        server.stop()
    rejected = events(vault, "dicom.association.rejected")
    assert any(e["ae"] == "NODEB" and "revoked" in str(e["message"]) for e in rejected)


def test_unseal_cli_with_a_passphrase_file(tmp_path: Path) -> None:
    """``pacsvault unseal --passphrase-file`` (0600): a wrong one is one error line and the
    server stays sealed; the right one unseals."""
    from tests.helpers import pv
    from tests.web_helpers import write_secret

    vault = _vault(tmp_path / "v")
    passphrase = "une barque verte au large de Brest le soir"
    pp = write_secret(tmp_path / "pp", passphrase)
    wrong = write_secret(tmp_path / "wrong", "une barque rouge au large de Brest le soir")
    vault.cli("keys", "protect", "--passphrase", "--passphrase-file", pp)
    files = corpus.synthetic_ct_series(tmp_path / "a", 1, seed=41)
    server = start_server(vault)
    try:
        assert "ARCHIVE SEALED" in server.log()
        refused = pv("unseal", "--data", vault.data, "--key-file", vault.key,
                     "--passphrase-file", wrong, check=False)
        assert refused.returncode == 2 and refused.stderr.count("pacsvault: error:") == 1
        _stored_ok(storescu(server.port, files, calling=MODALITY), 1)  # still receiving
        out = pv("unseal", "--data", vault.data, "--key-file", vault.key,
                 "--passphrase-file", pp).stdout
        assert "1 object(s)" in out, out
    finally:
        server.stop()
