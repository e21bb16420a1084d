"""Issue 14 item 5: erasing a patient (crypto-shredding + rows), in-process over a real vault.

Erase -> the patient's objects are unreadable (index rows gone, files gone, a copy of a file
taken before opens with no key of the vault), other patients intact; the tombstone in the
trail says who/when/why with no patient data and no sealed references; during retention
the erasure is refused without a legal reason; a requester cannot confirm their own
request; the solo path needs the setting, a single admin and the ID typed again.
(The CLI while ``serve`` runs and the admin page: tests/test_erasure_live.py.)
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from sqlalchemy import select

from pacsvault.crypto.keyring import KeyDestroyed, Keyring
from pacsvault.index.keyrows import DataKeyRows
from pacsvault.index.models import DataKey, Instance, ObjectAction, Patient, Study
from pacsvault.storage.archive import StoreStatus
from pacsvault.storage.erasure import (
    Eraser,
    ErasureError,
    ErasureRequest,
    RetentionRunning,
)
from tests.harness.backends import Backend
from tests.helpers import VaultDir, events

OLD = "19990101"  # retention over (20 years)
REASON = "Demande du patient, aucune obligation légale de conserver (courrier du 2 mars)"


@dataclass(frozen=True)
class Obj:
    raw: bytes
    sop: str
    study: str
    patient: str
    series: str = ""


def make(patient: str, *, study: str | None = None, study_date: str = OLD,
         birth: str = "", name: str = "", modality: str = "CT") -> Obj:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = (DigitalMammographyXRayImageStorageForPresentation if modality == "MG"
                 else CTImageStorage)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = name or f"Erasure^{patient}", patient
    ds.PatientBirthDate = birth
    ds.Modality, ds.InstanceNumber = modality, 1
    ds.StudyDate = study_date
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(32)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Obj(buf.getvalue(), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), patient,
               str(ds.SeriesInstanceUID))


def store(v: Any, *objs: Obj) -> None:
    for o in objs:
        assert v.archive.store(o.raw, source_ae="TEST").status is StoreStatus.STORED
    v.archive.settle()


def object_file(v: Any, sop: str) -> Path:
    (item,) = list(v.archive.locate(sop_uid=sop))
    return Path(v.objects.path(item.object_id))


def trail_lines(vault: VaultDir) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (vault.data / "audit" / "trail.jsonl").read_text()
            .splitlines() if x.startswith("{")]


class Admins:
    """Stand-in for the accounts: the names of the enabled administrators."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def __call__(self) -> list[str]:
        return list(self.names)


@pytest.fixture
def vault(tmp_path: Path, backend: Backend) -> VaultDir:
    """Once per index backend (issue 16): embedded, then sealed PostgreSQL."""
    return backend.new_vault(tmp_path / "v")


def test_erase_destroys_every_key_row_and_file_and_leaves_a_blind_tombstone(
        vault: VaultDir, opened: Any, tmp_path: Path) -> None:
    v = opened
    a1 = make("PVER01", name="Dupont^Jeanne")
    a2 = make("PVER01", study=a1.study, name="Dupont^Jeanne")
    a3 = make("PVER01", name="Dupont^Jeanne", modality="MG")  # a second study
    other = make("PVER02", name="Martin^Paul")
    store(v, a1, a2, a3, other)
    files = [object_file(v, o.sop) for o in (a1, a2, a3)]
    copy = tmp_path / "copy.pvo"
    shutil.copy(files[0], copy)
    # a second data key for the same patient (what sealed mode makes): erased too
    with v.sessions() as s:
        row = s.scalars(select(Instance).where(Instance.sop_uid == a3.sop)).one()
        second = Keyring(bytes(32), DataKeyRows()).create(s)
        row.key_id = str(second)
        s.commit()
        patient_key = s.scalars(select(Patient.key_id)
                                .where(Patient.patient_id == "PVER01")).one()

    eraser = Eraser(v)
    target = eraser.find("PVER01")
    assert target.instances == 3 and target.studies == 2
    assert set(target.keys) == {patient_key, str(second)}
    assert target.retention_over()
    request = eraser.request("PVER01", "", REASON, "retention-ended", actor="alice")
    with pytest.raises(ErasureError, match="cannot confirm"):
        eraser.confirm(request, actor="alice")
    result = eraser.confirm(request, actor="bob", address="192.0.2.7", via="test")
    (done,) = result.erased
    assert (done.instances, done.studies, done.keys_destroyed, done.files_deleted) == (
        3, 2, 2, 3)

    # gone from the live store: no rows, no files, no keys
    assert list(v.archive.locate(study_uid=a1.study)) == []
    assert list(v.archive.locate(sop_uid=a3.sop)) == []
    assert not any(f.exists() for f in files)
    with v.sessions() as s:
        assert s.scalars(select(Patient).where(Patient.patient_id == "PVER01")).all() == []
        assert s.scalars(select(Study).where(Study.study_uid == a1.study)).all() == []
        keys = {k.key_id: k for k in s.scalars(select(DataKey))}
        assert keys[patient_key].wrapped is None and keys[str(second)].wrapped is None
        assert keys[patient_key].destroyed is not None
        # the copy taken before names a key that is gone: nothing can open it
        with pytest.raises(KeyDestroyed):
            Keyring(bytes(32), DataKeyRows()).get(s, uuid.UUID(bytes=copy.read_bytes()[16:32]))
        action = s.get(ObjectAction, done.record)
        assert action is not None and action.action == "erase"
        assert action.uid == target.subject and "PVER01" not in action.uid
        assert REASON in action.reason and action.pending == ""
        req = s.get(ErasureRequest, request)
        assert req is not None and req.status == "done" and req.decided_by == "bob"
        assert "PVER01" not in req.patients
    # the other patient is intact and readable
    (item,) = list(v.archive.locate(sop_uid=other.sop))
    assert b"Martin^Paul" in v.archive.read(item)

    # the tombstone: who/when/why reference, counts; no sealed refs, no patient data
    (tomb,) = events(vault, "patient.erased")
    assert tomb["user"] == "bob" and tomb["requested_by"] == "alice"
    assert tomb["confirmed_by"] == "bob" and tomb["legal_basis"] == "retention-ended"
    assert tomb["instances"] == 3 and tomb["studies"] == 2 and tomb["keys_destroyed"] == 2
    assert tomb["record"] == done.record and tomb["mode"] == "two-admin"
    line = next(x for x in trail_lines(vault) if x["action"] == "patient.erased")
    assert "refs" not in line
    text = json.dumps(line)
    for secret in ("PVER01", "Dupont", "Jeanne", a1.study, a1.sop, REASON[:20]):
        assert secret not in text
    whole = (vault.data / "audit" / "trail.jsonl").read_text()
    for secret in ("PVER01", "Dupont", "Jeanne", a1.study, a1.sop):  # no record, none
        assert secret not in whole
    assert v.audit.verify().ok


def test_erasure_during_retention_needs_a_legal_reason(opened: Any) -> None:
    v = opened
    recent = make("PVER03", study_date="20240301")
    store(v, recent)
    eraser = Eraser(v)
    assert not eraser.find("PVER03").retention_over()
    with pytest.raises(RetentionRunning, match="legal"):
        eraser.request("PVER03", "", REASON, "retention-ended", actor="alice")
    with pytest.raises(ErasureError, match="legal basis"):
        eraser.request("PVER03", "", REASON, "because", actor="alice")
    with pytest.raises(ErasureError, match="reason"):
        eraser.request("PVER03", "", "  ", "patient-request", actor="alice")
    with pytest.raises(ErasureError, match="no patient"):
        eraser.request("NOBODY", "", REASON, "patient-request", actor="alice")
    assert list(v.archive.locate(sop_uid=recent.sop))  # nothing happened
    request = eraser.request("PVER03", "", REASON, "patient-request", actor="alice")
    result = eraser.confirm(request, actor="bob")
    assert result.instances == 1 and list(v.archive.locate(sop_uid=recent.sop)) == []
    with pytest.raises(ErasureError, match="no pending"):
        eraser.confirm(request, actor="carol")  # done once


def test_solo_practice_path(vault: VaultDir) -> None:
    v = vault.open()
    try:
        store(v, make("PVER04"))
        eraser = Eraser(v)
        with pytest.raises(ErasureError, match="solo_practice"):
            eraser.erase_solo("PVER04", "", REASON, "retention-ended", "PVER04", actor="alice")
    finally:
        v.close()
    vault.set_toml("retention", "solo_practice", "true")
    v = vault.open()
    try:
        eraser = Eraser(v)
        eraser.admins = Admins("alice", "bob")  # type: ignore[method-assign]
        with pytest.raises(ErasureError, match="several administrators"):
            eraser.erase_solo("PVER04", "", REASON, "retention-ended", "PVER04", actor="alice")
        eraser.admins = Admins("alice")  # type: ignore[method-assign]
        with pytest.raises(ErasureError, match="differs"):
            eraser.erase_solo("PVER04", "", REASON, "retention-ended", "PVER05", actor="alice")
        result = eraser.erase_solo("PVER04", "", REASON, "retention-ended", " PVER04 ",
                                   actor="alice", via="test")
        assert result.instances == 1
    finally:
        v.close()
    (tomb,) = events(vault, "patient.erased")
    assert tomb["mode"] == "solo" and tomb["requested_by"] == tomb["confirmed_by"] == "alice"


def test_expired_batch_skips_a_patient_whose_retention_restarted(opened: Any) -> None:
    v = opened
    old1, old2, young = make("PVER06"), make("PVER07"), make("PVER08", study_date="20250101")
    store(v, old1, old2, young)
    eraser = Eraser(v)
    assert [p.patient_id for p in eraser.expired()] == ["PVER06", "PVER07"]
    request = eraser.request_expired("end of retention", actor="alice")
    store(v, make("PVER07", study_date="20250601"))  # a new exam: kept 20 more years
    result = eraser.confirm(request, actor="bob")
    assert len(result.erased) == 1 and result.skipped == 1
    assert list(v.archive.locate(sop_uid=old1.sop)) == []
    assert list(v.archive.locate(sop_uid=old2.sop)) and list(v.archive.locate(sop_uid=young.sop))


def test_rows_of_destroyed_keys_are_forgotten_after_a_restore(opened: Any) -> None:
    """A backup's data snapshot from before an erasure still holds the patient's rows; the
    restore finds no key for them (destroyed): ``forget_shredded`` removes those rows and
    files, and nothing else."""
    v = opened
    gone1, gone2, kept = make("PVER09"), make("PVER09"), make("PVER10")
    store(v, gone1, gone2, kept)
    path = object_file(v, gone1.sop)
    with v.sessions() as s:  # what the restore does with a key absent from the keystore
        key = s.scalars(select(Patient.key_id).where(Patient.patient_id == "PVER09")).one()
        row = s.get(DataKey, key)
        assert row is not None
        row.wrapped = None
        s.commit()
    eraser = Eraser(v)
    assert eraser.forget_shredded() == 1
    assert list(v.archive.locate(sop_uid=gone1.sop)) == []
    assert list(v.archive.locate(sop_uid=gone2.sop)) == [] and not path.exists()
    with v.sessions() as s:
        assert s.scalars(select(Patient).where(Patient.patient_id == "PVER09")).all() == []
    assert len(list(v.archive.locate(sop_uid=kept.sop))) == 1
    assert eraser.forget_shredded() == 0  # idempotent


def test_atna_message_of_the_tombstone_says_delete() -> None:
    """PS3.15 A.5.3.3: the tombstone exported over syslog is a deletion ("D")."""
    from pacsvault.audit import AuditEvent, EventCode, Outcome
    from pacsvault.audit.atna import AuditMessageBuilder

    xml = AuditMessageBuilder("PACSVAULT", hostname="archive").to_bytes(AuditEvent(
        action="patient.erased", outcome=Outcome.SUCCESS, code=EventCode.INSTANCES_ACCESSED,
        actor_user="bob", detail={"instances": 3}))
    assert b'EventActionCode="D"' in xml and b'csd-code="110103"' in xml


def test_a_request_lapses_after_a_week(opened: Any) -> None:
    import datetime as dt

    v = opened
    store(v, make("PVER11"))
    eraser = Eraser(v)
    request = eraser.request("PVER11", "", REASON, "retention-ended", actor="alice")
    with v.sessions() as s:
        row = s.get(ErasureRequest, request)
        assert row is not None
        row.created = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
        s.commit()
    assert eraser.requests(pending_only=True) == []
    assert eraser.requests()[0].status == "lapsed"
    with pytest.raises(ErasureError, match="no pending"):
        eraser.confirm(request, actor="bob")
    assert len(eraser.find("PVER11").keys) == 1  # nothing erased
