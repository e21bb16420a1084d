"""Issue 14: a key destroyed by an admin removal (``study delete`` leaving a patient without
instances, not only a patient erasure) must leave the backups too. The backup job, at its
next tick, notices a key destroyed after the last keystore it pushed and replaces every
target's keystore, so a restore of the older data snapshot cannot open that patient."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pacsvault.crypto.keyring import KeyDestroyed
from pacsvault.vault import Vault
from tests.helpers import events, make_vault
from tests.test_erasure import make, store

RESTIC = shutil.which("restic") or "/usr/bin/restic"


@pytest.mark.slow
@pytest.mark.skipif(not Path(RESTIC).exists(), reason="restic not installed")
def test_study_delete_reaches_the_backups_at_the_next_tick(tmp_path: Path) -> None:
    from pacsvault.backup import runner, schedule

    vault = make_vault(tmp_path / "v")
    repo = tmp_path / "repo"
    with open(vault.data / "pacsvault.toml", "a") as fh:
        fh.write(f'\n[[backup.targets]]\nname = "usb"\nrepository = "{repo}"\n')
    gone, kept = make("PVRM01"), make("PVRM02")
    v = vault.open()
    try:
        store(v, gone, kept)
    finally:
        v.close()
    vault.cli("backup", "init")
    vault.cli("backup", "run")
    vault.cli("study", "delete", gone.study, "--reason", "wrong patient", "--yes")

    v = vault.open()
    try:
        schedule.tick(v)  # nothing else is due: the daily run was just made
        kinds = [s.kind for s in runner.list_snapshots(v, "usb")]
        assert kinds.count("data") == 1  # no new data snapshot was needed
        assert kinds.count("keystore") == 1
        schedule.tick(v)  # once only: the keystore is now newer than the destruction
    finally:
        v.close()
    assert len([e for e in events(vault, "backup.keystore") if e["outcome"] == "success"]) == 1

    new, new_key = tmp_path / "new", tmp_path / "k" / "master.key"
    info = runner.restore(str(repo), None, vault.recovery_code, new, new_key)
    assert info.keys_absent == 1
    restored = Vault.open(new, new_key)
    try:
        (item,) = list(restored.archive.locate(sop_uid=gone.sop))
        with pytest.raises(KeyDestroyed):
            restored.archive.read(item)
        (other,) = list(restored.archive.locate(sop_uid=kept.sop))
        assert restored.archive.read(other) is not None
    finally:
        restored.close()
