"""Issue 14 item 5: ``pacsvault patient`` on a solo practice's vault (the real CLI, no server):
the confirmation is typed at a terminal (the patient ID again, or the number of expired
patients); during retention a legal basis is required; every refusal is one error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import events, make_vault
from tests.test_erasure import make, store
from tests.test_erasure_live import run_tty

REASON = "Demande du patient (courrier du 4 avril)"


@pytest.mark.slow
def test_solo_practice_cli(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")  # one administrator
    objs = {p: make(p, study_date=date) for p, date in (
        ("PVCLI1", "19990101"), ("PVCLI2", "19990101"), ("PVCLI3", "20250101"),
        ("PVCLI4", "20000101"), ("PVCLI5", "20000101"))}
    v = vault.open()
    try:
        store(v, *objs.values())
    finally:
        v.close()
    data = ["--data", str(vault.data), "--key-file", str(vault.key)]

    # the setting is off: refused before anything is asked
    off = vault.cli("patient", "erase", "PVCLI1", "--reason", REASON, "--solo", check=False)
    assert off.returncode == 2 and "solo_practice" in off.stderr
    vault.set_toml("retention", "solo_practice", "true")
    piped = vault.cli("patient", "erase", "PVCLI1", "--reason", REASON, "--solo",
                      check=False, input="PVCLI1\n")
    assert piped.returncode == 2 and "terminal" in piped.stderr  # typed, never piped

    listed = vault.cli("patient", "list-expiring")
    assert [line.split()[5] for line in listed.stdout.splitlines()[1:]] == [
        "PVCLI1", "PVCLI2", "PVCLI4", "PVCLI5"]
    soon = vault.cli("patient", "list-expiring", "--within", str(365 * 30))
    assert "PVCLI3" in soon.stdout

    code, out = run_tty(["patient", "erase", "PVCLI1", "--reason", REASON, "--solo", *data],
                        [("Type the patient ID again", "PVCLI2")])
    assert code == 2 and out.count("pacsvault: error:") == 1 and "differs" in out
    code, out = run_tty(["patient", "erase", "PVCLI1", "--reason", REASON, "--solo", *data],
                        [("Type the patient ID again", "PVCLI1")])
    assert code == 0 and "Erased 1 patient(s): 1 instance(s), 1 data key(s)" in out, out
    export = vault.cli("export", "--out", tmp_path / "out", "--patient", "PVCLI1",
                       check=False)
    assert export.returncode == 2 and "nothing matches" in export.stderr

    # during retention: a legal basis is required
    early = vault.cli("patient", "erase", "PVCLI3", "--reason", REASON, "--solo", check=False)
    assert early.returncode == 2 and "retention period has not ended" in early.stderr
    code, out = run_tty(["patient", "erase", "PVCLI3", "--reason", REASON, "--solo",
                         "--legal-basis", "patient-request", *data],
                        [("Type the patient ID again", "PVCLI3")])
    assert code == 0, out

    # every expired patient, confirmed by typing how many
    code, out = run_tty(["patient", "erase-expired", "--solo", *data],
                        [("Type their number again", "3")])
    assert code == 0 and "Erased 3 patient(s)" in out, out
    assert "No patient" in vault.cli("patient", "list-expiring").stderr
    requests = vault.cli("patient", "requests").stdout
    assert requests.count("done by local-admin (solo)") == 3

    tombs = events(vault, "patient.erased")
    assert len(tombs) == 5 and {t["via"] for t in tombs} == {"cli"}
    assert sorted(str(t["legal_basis"]) for t in tombs).count("patient-request") == 1
    v = vault.open()
    try:
        assert list(v.archive.locate()) == []
    finally:
        v.close()
