"""Issue 14 item 5: an erasure reaches the backups. A backup taken before the erasure,
restored afterwards, gives that patient's objects unreadable (the erasure replaced every
repository's keystore through ``backup.runner.keys_destroyed``), and ``forget_shredded``
then removes the rows the old data snapshot brought back; the other patient is intact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pacsvault.crypto.keyring import KeyDestroyed
from pacsvault.storage.erasure import Eraser
from pacsvault.vault import Vault
from tests.helpers import events, make_vault, pv
from tests.test_erasure import make, store

RESTIC = shutil.which("restic") or "/usr/bin/restic"


@pytest.mark.slow
@pytest.mark.skipif(not Path(RESTIC).exists(), reason="restic not installed")
def test_backup_taken_before_the_erasure_restores_the_patient_unreadable(
        tmp_path: Path) -> None:
    from pacsvault.backup import runner

    vault = make_vault(tmp_path / "v")
    repo = tmp_path / "repo"
    with open(vault.data / "pacsvault.toml", "a") as fh:
        fh.write(f'\n[[backup.targets]]\nname = "usb"\nrepository = "{repo}"\n')
    gone, kept = make("PVBK01", name="Bernard^Lea"), make("PVBK02")
    v = vault.open()
    try:
        store(v, gone, kept)
    finally:
        v.close()
    vault.cli("backup", "init")
    vault.cli("backup", "run")

    v = vault.open()
    try:
        eraser = Eraser(v)
        request = eraser.request("PVBK01", "", "fin de conservation", "retention-ended",
                                 actor="alice")
        result = eraser.confirm(request, actor="bob")
        assert result.instances == 1 and result.backups == "ok"
        kinds = [s.kind for s in runner.list_snapshots(v, "usb")]
    finally:
        v.close()
    assert kinds.count("keystore") == 1  # the older keystore (with the key) is pruned
    (tomb,) = events(vault, "patient.erased")
    assert tomb["backups"] == "ok"

    new, new_key = tmp_path / "new", tmp_path / "k" / "master.key"
    restored_info = runner.restore(str(repo), None, vault.recovery_code, new, new_key)
    assert restored_info.keys_absent == 1
    restored = Vault.open(new, new_key)
    try:
        (item,) = list(restored.archive.locate(sop_uid=gone.sop))  # the old index row...
        with pytest.raises(KeyDestroyed):  # ...names an object nothing can open
            restored.archive.read(item)
        assert Eraser(restored).forget_shredded() == 1
        assert list(restored.archive.locate(sop_uid=gone.sop)) == []
        (other,) = list(restored.archive.locate(sop_uid=kept.sop))
        assert restored.archive.read(other) is not None
    finally:
        restored.close()

    # The command a practice runs after a disaster forgets those rows by itself: an
    # erased patient's name and headers never come back from an older snapshot.
    code_file = tmp_path / "code.txt"
    code_file.write_text(vault.recovery_code)
    code_file.chmod(0o600)
    again, again_key = tmp_path / "again", tmp_path / "k2" / "master.key"
    out = pv("backup", "restore", "--repository", repo, "--to", again,
             "--key-file", again_key, "--recovery-code-file", code_file)
    assert "erased patient" in out.stdout
    restored = Vault.open(again, again_key)
    try:
        assert list(restored.archive.locate(sop_uid=gone.sop)) == []
        (other,) = list(restored.archive.locate(sop_uid=kept.sop))
        assert restored.archive.read(other) is not None
    finally:
        restored.close()
