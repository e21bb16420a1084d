"""The merge settles what sealed mode could not check, exactly as ``Archive.store`` would:
an identical re-send is dropped, the same instance re-encoded is a benign duplicate, a
different object under a known SOP Instance UID is a conflict (first kept, security
event). In-process: the sealed archive and the unseal of ``sealed.runtime`` over a real
vault (the server around them is tested in test_sealed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from pacsvault import config
from pacsvault.index.models import DataKey, Instance
from pacsvault.sealed import merge
from pacsvault.sealed.runtime import SealedRuntime
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault
from tests.helpers import make_vault


def _variants(tmp_path: Path) -> tuple[bytes, bytes, bytes]:
    ds = dcmread(cast(str, get_testdata_file("CT_small.dcm")))
    original = tmp_path / "original.dcm"
    ds.save_as(original, enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    reencoded = tmp_path / "implicit.dcm"
    ds.save_as(reencoded, enforce_file_format=True, implicit_vr=True, little_endian=True)
    other = dcmread(original)
    other.InstanceNumber = 99
    conflict = tmp_path / "conflict.dcm"
    other.save_as(conflict, enforce_file_format=True)
    return original.read_bytes(), reencoded.read_bytes(), conflict.read_bytes()


def test_merge_settles_duplicates_as_store_would(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    original, reencoded, conflict = _variants(tmp_path)
    fresh = dcmread(cast(str, get_testdata_file("MR_small.dcm")))
    fresh_path = tmp_path / "fresh.dcm"
    fresh.save_as(fresh_path, enforce_file_format=True)
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.store(original, source_ae="CT").status is StoreStatus.STORED
        v.archive.settle()
    finally:
        v.close()
    runtime = SealedRuntime(vault.data, config.load(vault.data), vault.key)
    try:
        for raw in (original, reencoded, conflict, fresh_path.read_bytes()):
            assert runtime.archive.store(raw, source_ae="CT").status is StoreStatus.STORED
        report = runtime.unseal(channel="test")
    finally:
        runtime.close()
        if runtime.vault is not None:
            runtime.vault.close()
    assert report["stored"] == 1 and report["duplicates"] == 2 and report["conflicts"] == 1
    assert not merge.pending(vault.data)
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.counts()["instances"] == 2
        sop = str(dcmread(cast(str, get_testdata_file("CT_small.dcm"))).SOPInstanceUID)
        (kept,) = list(v.archive.locate(sop_uid=sop))
        assert v.archive.read(kept)[132:] == original[132:]  # the first one, unchanged
        with v.sessions() as session:
            keys = {str(k.key_id): bytes(k.wrapped or b"") for k in session.scalars(
                select(DataKey))}
            used = set(session.scalars(select(Instance.key_id)))
        # the new patient's sealed key joined as an ordinary key; no key for the dropped
        assert used <= set(keys) and all(w[0] == 1 for w in keys.values())
        assert len(keys) == 2
        actions = [r.action for r in v.audit.records()]
    finally:
        v.close()
    assert "sealed.store.conflict" in actions
    assert "dicom.store.duplicate" in actions  # the re-encoded one, recorded as store does
    assert "sealed.merged" in actions
    # the objects of the dropped copies are gone from the store
    objects = [p for p in (vault.data / "objects").rglob("*.pvo")]
    assert len(objects) == 2


def test_deleting_a_study_destroys_the_sealed_key_too(tmp_path: Path) -> None:
    """A patient received before and while sealed holds two data keys (theirs, and the
    sealed session's, re-wrapped at the merge): removing their last study crypto-shreds
    both, so nothing of theirs stays readable in a copy of ``objects/``."""
    from pacsvault.storage.removal import Remover
    from tests import corpus

    vault = make_vault(tmp_path / "v")
    before, during = corpus.synthetic_ct_series(tmp_path / "s", 2, seed=11)
    study_uid = str(dcmread(before).StudyInstanceUID)
    v = Vault.open(vault.data, vault.key)
    try:
        v.archive.store(before.read_bytes(), source_ae="CT")
        v.archive.settle()
    finally:
        v.close()
    runtime = SealedRuntime(vault.data, config.load(vault.data), vault.key)
    try:
        runtime.archive.store(during.read_bytes(), source_ae="CT")
        runtime.unseal(channel="test")
    finally:
        runtime.close()
        if runtime.vault is not None:
            runtime.vault.close()
    v = Vault.open(vault.data, vault.key)
    try:
        with v.sessions() as session:
            live = [k for k in session.scalars(select(DataKey)) if k.wrapped is not None]
            assert len(live) == 2  # the patient's own key and the sealed session's
        Remover(v.engine, v.objects, v.recorder).delete("study", study_uid, "test",
                                                        actor="test")
        with v.sessions() as session:
            assert all(k.wrapped is None for k in session.scalars(select(DataKey)))
    finally:
        v.close()


def test_unseal_without_a_running_server_is_one_error_line(tmp_path: Path) -> None:
    from tests.helpers import pv

    vault = make_vault(tmp_path / "v")
    proc = pv("unseal", "--data", vault.data, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pacsvault: error: no server is running")


def test_a_damaged_journal_record_does_not_keep_the_others_out(tmp_path: Path) -> None:
    from tests import corpus

    vault = make_vault(tmp_path / "v")
    files = corpus.synthetic_ct_series(tmp_path / "s", 3, seed=12)
    runtime = SealedRuntime(vault.data, config.load(vault.data), vault.key)
    try:
        for path in files:
            runtime.archive.store(path.read_bytes(), source_ae="CT")
        (stores,) = list((vault.data / "sealed" / "journal").glob("*.stores"))
        data = bytearray(stores.read_bytes())
        data[4 + 40] ^= 0x01  # the first record's ciphertext
        stores.write_bytes(bytes(data))
        report = runtime.unseal(channel="test")
    finally:
        runtime.close()
        if runtime.vault is not None:
            runtime.vault.close()
    assert report["stored"] == 2 and report["damaged"] == 1
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.counts()["instances"] == 2
        assert "sealed.journal.damaged" in [r.action for r in v.audit.records()]
    finally:
        v.close()
