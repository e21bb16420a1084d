"""A new patient's data key minted before a master key rotation and committed after it
(the regression found by ``test_rotate_while_storescu_sends``): the key row must be wrapped
under the KEK of the commit, or the patient's images open with nothing once the rotation
has dropped the retired KEK. Deterministic: the rotation runs between the store's key
choice and its commit, in one process, as ``serve`` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from pacsvault.crypto import rotation
from pacsvault.vault import Vault
from tests.helpers import make_vault
from tests.test_rotation import patients_files

pytestmark = pytest.mark.slow


def test_key_minted_before_rotation_and_committed_after_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = make_vault(tmp_path / "v")
    files = [f for group in patients_files(tmp_path / "in", 2).values() for f in group]
    vault = Vault.open(made.data, made.key)
    try:
        archive = vault.archive
        archive.store(files[0].read_bytes(), source_ae="ROTMOD")  # one known patient
        commit = archive._commit
        rotated: list[object] = []

        def rotate_then_commit(pending: object) -> None:
            if not rotated:  # the new patient's key is minted: rotate before its commit
                rotated.append(rotation.rotate(vault, online=True))
            commit(pending)  # type: ignore[arg-type]

        monkeypatch.setattr(archive, "_commit", rotate_then_commit)
        new_patient = files[2]
        archive.store(new_patient.read_bytes(), source_ae="ROTMOD")
        monkeypatch.undo()
        assert rotated
        archive._keyring.forget_all()  # read from the rows, as a restarted server would
        for path in (files[0], new_patient):
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            [item] = list(archive.locate(sop_uid=sop))
            assert archive.read(item) == path.read_bytes()
    finally:
        vault.close()
    reopened = Vault.open(made.data, made.key)  # the new key file, from disk
    try:
        sop = str(dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
        [item] = list(reopened.archive.locate(sop_uid=sop))
        assert reopened.archive.read(item) == files[2].read_bytes()
    finally:
        reopened.close()
