"""One status report for ``pacsvault status`` and the Health page (issue 15).

Why: the two were separate implementations of one report (each read ``serve.json``, the
counts, nodes, certificates, key protection and backups its own way), so a fact added to
one was missing from the other. Both now render ``pacsvault.status.gather``'s
``StatusReport``; the existing tests of each (test_vault_cli, test_key_protection,
test_backup_ops_server, test_health_blocks, test_web_pages...) keep their outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import grimp
import pytest

from pacsvault.cli.main import main
from pacsvault.status import gather
from pacsvault.status.report import security_events
from pacsvault.status.text import as_json, lines
from tests.helpers import VaultDir

# What each report used to read by itself, now read only through pacsvault.status.
GATHERED = ("pacsvault.crypto.protection", "pacsvault.crypto.tls", "pacsvault.backup.health",
            "pacsvault.index.stats")


def test_status_and_health_page_render_one_report() -> None:
    graph = grimp.build_graph("pacsvault", exclude_type_checking_imports=True)
    for renderer in ("pacsvault.cli.setup", "pacsvault.web.admin_health"):
        imported = graph.find_modules_directly_imported_by(renderer)
        assert any(m == "pacsvault.status" or m.startswith("pacsvault.status.")
                   for m in imported), f"{renderer} does not render pacsvault.status"
        assert not imported & set(GATHERED), (renderer, sorted(imported & set(GATHERED)))


def _status(capsys: pytest.CaptureFixture[str], vault: VaultDir, *args: str) -> str:
    capsys.readouterr()
    assert main(["status", *args, "--data", str(vault.data),
                 "--key-file", str(vault.key)]) == 0
    return capsys.readouterr().out


def test_cli_prints_the_gathered_report(vault: VaultDir,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    vault.add_node("MODALITY", "--tls")
    as_text = _status(capsys, vault)
    as_dict = json.loads(_status(capsys, vault, "--json"))
    opened = vault.open()
    try:
        report = gather(opened, measure_objects=True)
        page = gather(opened, probe=True, listeners_for=8443, check_audit=True)
    finally:
        opened.close()
    assert as_dict == json.loads(json.dumps(as_json(report)))
    assert as_text.splitlines() == lines(report)
    assert [n.ae_title for n in report.nodes] == ["MODALITY"] and report.nodes[0].tls
    assert as_dict["server"] == {"running": False}
    assert as_dict["key"]["protection"] == report.key.protection == "file"
    assert not report.backup.configured and "WARNING" in as_text
    # the page's parts: asked for, not paid by the command
    assert report.listeners == () and report.audit is None
    assert report.storage.encrypted == 0 and page.storage.encrypted is None
    assert [item.kind for item in page.listeners] == ["dicom", "dicom_tls", "https"]
    assert page.listeners[2].port == 8443 and page.audit is not None and page.audit.ok
    assert {c.kind for c in page.certificates} == {"server", "ca"}
    assert all(c.days_left is not None and c.days_left > 300 for c in page.certificates)


def test_security_events_keep_no_message(tmp_path: Path) -> None:
    trail = tmp_path / "trail.jsonl"
    records = [
        {"kind": "event", "code": "110113", "action": "auth.login", "outcome": "4",
         "time": "2026-12-04T10:00:00.123Z", "user": "ann", "address": "10.0.0.9",
         "message": "patient DOE^JANE"},
        {"kind": "event", "code": "110100", "action": "exposure", "outcome": "8",
         "time": "2026-12-04T11:00:00Z", "ae": "SCANNER", "address": "203.0.113.7"},
        {"kind": "event", "code": "110100", "action": "dicom.store", "outcome": "0"},
        {"kind": "repair", "code": "110113"},
    ]
    trail.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    found = security_events(trail)
    assert [(e.action, e.who, e.address) for e in found] == [
        ("exposure", "SCANNER", "203.0.113.7"), ("auth.login", "ann", "10.0.0.9")]
    assert found[1].time == "2026-12-04 10:00:00"
    assert "DOE" not in repr(found)
