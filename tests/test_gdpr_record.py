"""Record of processing (issue 19): the art. 30 entry, pre-filled from the live vault.

One vault with two registered nodes, a user per role, no backup target and one stored
patient whose name and ID are markers: the entry lists each node as a recipient, shows
backups (and the other measures that are off) as off, in Markdown and in PDF (read back
with pypdf), in French too, names no patient, and every export is in the trail. The
``gdpr record`` command writes a 0600 PDF. The page (real application and HTTPS listener
in-process) is served to an administrator and an auditor, refused to a physician.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pypdf
import pytest

from pacsvault import gdpr
from tests.helpers import VaultDir, new_vault
from tests.test_erasure import make, store
from tests.web_helpers import FakeClock, LocalWeb, local_web

NODES = (("CTSCANNER7", "127.0.0.1", 11200, ("store",)),
         ("VIEWSTATION", "127.0.0.3", 11201, ("query", "retrieve")))
PATIENT_NAME, PATIENT_ID = "Zyxmarqueur^Pauline", "PVGDPR42"
PASSWORD = "cahier-de-bord-du-registre"


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    made = new_vault(tmp_path_factory.mktemp("gdpr") / "v")
    v = made.open()
    try:
        for ae, host, port, roles in NODES:
            v.nodes.add(ae, host, port, roles=roles)
        store(v, make(PATIENT_ID, name=PATIENT_NAME))
    finally:
        v.close()
    return made


@pytest.fixture(scope="module")
def web(vault_dir: VaultDir) -> Iterator[LocalWeb]:
    with local_web(vault_dir, FakeClock()) as served:
        for name, roles in (("chief", ["admin"]), ("dpo", ["auditor"]),
                            ("drmartin", ["physician"])):
            served.accounts.add_user(name, roles, PASSWORD)
        yield served


def plain(markdown: str) -> str:
    """The Markdown without its escapes (``127\\.0\\.0\\.1`` → ``127.0.0.1``)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def pdf_text(data: bytes) -> str:
    assert data.startswith(b"%PDF")
    reader = pypdf.PdfReader(io.BytesIO(data))
    return " ".join(" ".join((page.extract_text() or "").split()) for page in reader.pages)


def exports(web: LocalWeb) -> list[dict[str, object]]:
    return [dict(r.detail) | {"user": r.actor_user} for r in web.vault.audit.records()
            if r.action == gdpr.ACTION]


def no_patient_data(text: str) -> None:
    for marker in (PATIENT_ID, "Zyxmarqueur", "Pauline"):
        assert marker not in text


def test_markdown_lists_every_node_and_shows_backups_off(web: LocalWeb) -> None:
    text = plain(gdpr.export(web.vault, lang="en", fmt="md", by="dpo").decode())
    assert text.startswith("# Record of processing activities (GDPR art. 30)")
    recipients = text.split("## Recipients", 1)[1].split("## ", 1)[0]
    for ae, host, port, _roles in NODES:
        [row] = [r for r in recipients.splitlines() if f"DICOM node {ae}" in r]
        assert f"host {host}, port {port}" in row
    assert "| Users with the role physician | internal (staff) | 1 active accounts |" in text
    security = text.split("## Security measures", 1)[1]
    rows = {r.split("|")[1].strip(): r.split("|")[2].strip()
            for r in security.splitlines() if r.startswith("| ")}
    assert rows["Backups (encrypted, restore drills)"] == "off"
    assert rows["Audit export to a collector (syslog/TLS)"] == "off"
    assert rows["Security alerts sent to a person"] == "off"
    assert rows["Encryption at rest"] == "on"
    assert rows["Plain DICOM (unencrypted)"] == "on"
    assert "no backup target configured" in security
    assert "Transfers outside the European Union\n\nNone" in text
    assert "______" in text  # the controller's lines to fill
    no_patient_data(text)
    assert exports(web)[-1] == {"document": "gdpr-art30", "lang": "en", "format": "md",
                                "via": "cli", "user": "dpo"}


def test_pdf_and_french(web: LocalWeb) -> None:
    text = pdf_text(gdpr.export(web.vault, lang="en", fmt="pdf", by="dpo"))
    for ae, _host, _port, _roles in NODES:
        assert f"DICOM node {ae}" in text
    assert re.search(r"Backups \(encrypted, restore drills\) off", text), text
    no_patient_data(text)
    french = pdf_text(gdpr.export(web.vault, lang="fr", fmt="pdf", by="dpo"))
    assert "Registre des activités de traitement (RGPD art. 30)" in french
    for ae, _host, _port, _roles in NODES:
        assert f"Nœud DICOM {ae}" in french
    assert re.search(r"Sauvegardes \(chiffrées, restaurations d’essai\) désactivé", french)
    no_patient_data(french)
    md = plain(gdpr.export(web.vault, lang="fr", fmt="md", by="dpo").decode())
    assert "| Sauvegardes (chiffrées, restaurations d’essai) | désactivé |" in md
    assert [e["format"] for e in exports(web)][-3:] == ["pdf", "pdf", "md"]


def test_backups_with_their_drill_remote_targets_and_the_last_check(
        web: LocalWeb) -> None:
    from pacsvault.backup.state import record_drill, state_path, update_target
    from pacsvault.config import BackupTarget

    settings = web.vault.settings
    web.vault.settings = settings.model_copy(update={"backup": settings.backup.model_copy(
        update={"targets": [BackupTarget(name="usb", repository="/media/usb/pv"),
                            BackupTarget(name="offsite",
                                         repository="s3:https://s3.example.net/b/pv")]})})
    layout = web.vault.layout
    check_state = layout.root / "check-state.json"
    check_state.write_text(json.dumps({
        "format": "pacsvault-check/1", "finished": "2026-12-01T02:00:00+00:00",
        "findings": [{"severity": "critical"}, {"severity": "warning"},
                     {"severity": "warning"}, {"severity": "info"}]}))
    try:
        update_target(layout, "offsite", lambda e: e.update(
            last_success=dt.datetime.now(dt.UTC).isoformat()))
        record_drill(layout, "offsite", True, "restored and verified")
        text = plain(gdpr.build(web.vault, "en").to_markdown())
    finally:
        web.vault.settings = settings
        state_path(layout).unlink()
        check_state.unlink()
    transfers = text.split("## Transfers outside the European Union", 1)[1].split("## ")[0]
    assert "| backup: offsite | s3.example.net | to be verified |" in transfers
    assert "usb" not in transfers
    [row] = [r for r in text.splitlines() if r.startswith("| Backups (encrypted")]
    assert "| on |" in row and "usb (local disk): never succeeded" in row
    assert re.search(r"offsite \(s3\.example\.net\): ok, last backup 20\d\d-[^,]+, last "
                     r"restore drill 20\d\d-\d\d-\d\d \d\d:\d\d UTC \(passed\)", row), row
    [row] = [r for r in text.splitlines() if r.startswith("| Security self-check")]
    assert "| run | last run 2026-12-01 02:00 UTC: 1 critical, 2 warnings |" in row


def test_the_page_for_admin_and_auditor_not_for_a_physician(web: LocalWeb) -> None:
    chief, dpo, doctor = web.browser(), web.browser(), web.browser()
    try:
        web.sign_in(chief, "chief", PASSWORD)
        web.sign_in(dpo, "dpo", PASSWORD)
        web.sign_in(doctor, "drmartin", PASSWORD)
        for path in ("/admin/record-of-processing", "/audit/record-of-processing"):
            assert doctor.get(path).status_code == 403
            assert doctor.get(path, params={"format": "pdf"}).status_code == 403
        page = chief.get("/admin/record-of-processing", params={"lang": "fr"})
        assert page.status_code == 200
        assert "Nœud DICOM CTSCANNER7" in page.text and "désactivé" in page.text
        assert 'href="/admin/record-of-processing" aria-current="page"' in page.text
        page = dpo.get("/audit/record-of-processing", params={"lang": "en"})
        assert page.status_code == 200 and "DICOM node VIEWSTATION" in page.text
        no_patient_data(page.text)
        pdf = dpo.get("/audit/record-of-processing", params={"lang": "en", "format": "pdf"})
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        assert "attachment" in pdf.headers["content-disposition"]
        assert "DICOM node CTSCANNER7" in pdf_text(pdf.content)
        assert dpo.get("/admin/record-of-processing").status_code == 403
        done = [(e["user"], e["format"], e["via"]) for e in exports(web)][-3:]
        assert done == [("chief", "html", "web"), ("dpo", "html", "web"),
                        ("dpo", "pdf", "web")]
    finally:
        for b in (chief, dpo, doctor):
            b.close()


def test_the_command_writes_a_private_pdf(vault_dir: VaultDir, tmp_path: Path) -> None:
    out = tmp_path / "registre.pdf"
    proc = vault_dir.cli("gdpr", "record", "--lang", "fr", "--format", "pdf", "--out", out)
    assert "Record of processing written to" in proc.stderr + proc.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "Nœud DICOM VIEWSTATION" in pdf_text(out.read_bytes())
    refused = vault_dir.cli("gdpr", "record", "--format", "pdf", check=False)
    assert refused.returncode != 0 and "a PDF needs --out FILE" in refused.stderr
    md = vault_dir.cli("gdpr", "record").stdout
    assert md.startswith("# Record of processing activities")
