"""Issue 11: an admin can remove a bad object (delete with crypto-shredding, quarantine).

* in-process, over a real vault: what each level of deletion removes (rows, counts, files,
  the patient's data key when nothing of theirs is left), what quarantine hides (C-FIND/QIDO
  answers at every level, C-MOVE/C-GET/WADO selection) and keeps (export, duplicates);
* the command line while the real server runs and has the study in its caches: the study
  comes back only with what is sent again, under a new data key, readable;
* the admin page: find by UID, confirm, reason; other roles refused.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select

from pacsvault.audit import EventCode
from pacsvault.crypto.keyring import KeyDestroyed, Keyring
from pacsvault.index.keyrows import DataKeyRows
from pacsvault.index.models import (
    DataKey,
    ObjectAction,
    Patient,
    Series,
    Study,
    patient_tokens,
    series_tokens,
    study_tokens,
)
from pacsvault.index.query import QueryEngine
from pacsvault.storage.archive import StoreStatus
from pacsvault.storage.removal import NotFound, RemovalError, Remover
from tests.harness.backends import Backend
from tests.helpers import AE, VaultDir, events, new_vault, start_server, storescu
from tests.web_helpers import FakeClock, csrf_of, local_web

REASON = "Envoyé au mauvais patient, signalé par le Dr Test"


@dataclass(frozen=True)
class Obj:
    raw: bytes
    sop: str
    series: str
    study: str
    patient: str


def make(patient: str, study: str, series: str, *, modality: str = "CT",
         institution: str = "Cabinet", number: int = 1) -> Obj:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = f"Removal^{patient}", patient
    ds.Modality, ds.InstanceNumber, ds.InstitutionName = modality, number, institution
    ds.StudyDate = "20240101"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(32)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Obj(buf.getvalue(), str(ds.SOPInstanceUID), series, study, patient)


@pytest.fixture
def vault(tmp_path: Path, backend: Backend) -> VaultDir:
    """Once per index backend (issue 16): embedded, then sealed PostgreSQL."""
    return backend.new_vault(tmp_path / "v")


def store(v: Any, *objs: Obj) -> None:
    for o in objs:
        assert v.archive.store(o.raw, source_ae="TEST").status is StoreStatus.STORED
    v.archive.settle()


def ident(**values: str) -> Dataset:
    ds = Dataset()
    for k, val in values.items():
        setattr(ds, k, val)
    return ds


def found(v: Any, level: str, root: str = "STUDY", **keys: str) -> list[dict[str, Any]]:
    engine = QueryEngine(v.sessions, AE)
    return list(engine.find_json(level, ident(**keys), root=root))


def uids(answers: list[dict[str, Any]], tag: str) -> set[str]:
    return {a[tag]["Value"][0] for a in answers if "Value" in a.get(tag, {})}


def object_file(v: Any, sop: str) -> Path:
    (item,) = list(v.archive.locate(sop_uid=sop))
    return Path(v.objects.path(item.object_id))


def test_delete_each_level_and_crypto_shred_the_last_of_a_patient(
        vault: VaultDir, opened: Any, backend: Backend) -> None:
    v = opened
    s1, a, b = generate_uid(), generate_uid(), generate_uid()
    a1, a2, a3 = (make("PVRM01", s1, a, number=n) for n in (1, 2, 3))
    b1 = make("PVRM01", s1, b, modality="MR")
    s2, c = generate_uid(), generate_uid()
    c1, c2 = make("PVRM02", s2, c), make("PVRM02", s2, c, number=2)
    store(v, a1, a2, a3, b1, c1, c2)
    remover = Remover(v.engine, v.objects, v.recorder, v.archive)
    files = {o.sop: object_file(v, o.sop) for o in (a1, a2, a3, b1, c1, c2)}

    # an instance: its row and file go, counts follow, the patient keeps their key
    with pytest.raises(RemovalError):
        remover.delete("instance", a1.sop, "   ", actor="admin-test")  # reason required
    done = remover.delete("instance", a1.sop, REASON, actor="admin-test")
    assert done.plan.instances == 1 and done.plan.keys_destroyed == ()
    assert done.files_deleted == 1 and not files[a1.sop].exists()
    assert all(files[o.sop].exists() for o in (a2, a3, b1, c1, c2))
    with v.sessions() as s:
        study = s.scalar(select(Study).where(Study.study_uid == s1))
        assert study is not None and (study.num_instances, study.num_series) == (3, 2)
        series = s.scalar(select(Series).where(Series.series_uid == a))
        assert series is not None and series.num_instances == 2
    assert uids(found(v, "IMAGE", StudyInstanceUID=s1, SOPInstanceUID=""), "00080018") == {
        a2.sop, a3.sop, b1.sop}

    # a series: the study loses it (count and modality)
    remover.delete("series", b, REASON, actor="admin-test")
    with v.sessions() as s:
        study = s.scalar(select(Study).where(Study.study_uid == s1))
        assert study is not None and (study.num_series, study.modalities) == (1, "CT")
        assert s.scalar(select(Series).where(Series.series_uid == b)) is None

    # the last study of a patient: rows gone, data key destroyed, files gone
    with v.sessions() as s:
        key_id = s.scalar(select(Patient.key_id).where(Patient.patient_id == "PVRM02"))
    copy = files[c1.sop].read_bytes()  # a copy of the ciphertext, as in a backup
    plan = remover.plan("study", s2)
    assert plan.keys_destroyed == (key_id,) and plan.patients_removed == 1
    done = remover.delete("study", s2, REASON, actor="admin-test", expected=plan)
    assert not files[c1.sop].exists() and not files[c2.sop].exists()
    with v.sessions() as s:
        assert s.scalar(select(Patient).where(Patient.patient_id == "PVRM02")) is None
        assert s.scalar(select(Study).where(Study.study_uid == s2)) is None
        row = s.get(DataKey, key_id)
        assert row is not None and row.wrapped is None and row.destroyed is not None
        action = s.get(ObjectAction, done.action_id)
        assert action is not None and action.reason == REASON and action.pending == ""
    # a copy of the ciphertext (a backup) names a key that no longer opens: gone for good
    assert copy[16:32] == uuid.UUID(key_id).bytes
    with v.sessions() as s, pytest.raises(KeyDestroyed):
        Keyring(bytes(32), DataKeyRows()).get(s, uuid.UUID(key_id))
    with pytest.raises(NotFound):
        remover.plan("study", s2)
    assert found(v, "STUDY", StudyInstanceUID=s2) == []

    # the same patient sent again: a new patient row and a new key, readable
    store(v, c1)
    (item,) = list(v.archive.locate(sop_uid=c1.sop))
    assert item.key_id != uuid.UUID(key_id)
    assert v.archive.read(item) == c1.raw

    # audited: DICOM Instances Accessed, references sealed, the reason never in clear
    records = events(vault, "object.deleted")
    assert len(records) == 3
    last = records[-1]
    assert last["code"] == EventCode.INSTANCES_ACCESSED.value
    assert last["user"] == "admin-test" and last["level"] == "study"
    assert last["keys_destroyed"] == 1 and last["record"] == done.action_id
    assert set(cast(list[str], last["sop_uids"])) == {c1.sop, c2.sop}
    assert last["patient_ids"] == ["PVRM02"] and last["study_uids"] == [s2]
    # grouped per patient although the rows are gone: the patient's access request sees it
    (record,) = [r for r in v.audit.records() if r.action == "object.deleted"
                 and r.detail.get("record") == done.action_id]
    assert "unassigned" not in record.refs
    assert set(record.refs["patients"]["PVRM02"]["sop_uids"]) == {c1.sop, c2.sop}
    trail = (vault.data / "audit" / "trail.jsonl").read_text("utf-8")
    assert "mauvais patient" not in trail and s2 not in trail and "PVRM02" not in trail
    # the blind tokens of a sealed index (issue 16) went with their rows: none is left
    # pointing at a deleted row (on SQLite the token tables are empty)
    with v.sessions() as s:
        for tokens, table in ((patient_tokens, Patient), (study_tokens, Study),
                              (series_tokens, Series)):
            left = set(s.scalars(select(tokens.c.row_pk).distinct()))
            assert left <= set(s.scalars(select(table.pk))), tokens.name
            assert bool(left) is backend.is_postgres


def test_quarantine_hides_from_queries_and_retrieval_but_keeps(vault: VaultDir,
                                                               opened: Any) -> None:
    v = opened
    s3, d = generate_uid(), generate_uid()
    bad = make("PVRM03", s3, d, institution="BROKEN", number=1)  # first: the stored header
    good = make("PVRM03", s3, d, institution="GOOD", number=2)
    other = make("PVRM04", generate_uid(), generate_uid())
    store(v, bad, good, other)
    engine = QueryEngine(v.sessions, AE)
    remover = Remover(v.engine, v.objects, v.recorder, v.archive)
    inst = "00080080"  # InstitutionName

    assert uids(found(v, "STUDY", StudyInstanceUID=s3, InstitutionName=""), inst) == {
        "BROKEN"}
    change = remover.quarantine(bad.sop, "VR US dans le nom", actor="admin-test")
    assert change.action_id > 0
    with pytest.raises(RemovalError):
        remover.quarantine(bad.sop, "again", actor="admin-test")

    # every query level and every retrieval path
    assert uids(found(v, "IMAGE", StudyInstanceUID=s3, SOPInstanceUID=""), "00080018") == {
        good.sop}
    study_answer = found(v, "STUDY", StudyInstanceUID=s3, InstitutionName="",
                         NumberOfStudyRelatedInstances="")
    assert uids(study_answer, inst) == {"GOOD"}  # the header no longer the bad one's
    assert study_answer[0]["00201208"]["Value"] == [1]
    assert [i.sop_uid for i in engine.instances("STUDY", ident(StudyInstanceUID=s3))] == [
        good.sop]
    assert engine.instances("IMAGE", ident(StudyInstanceUID=s3, SeriesInstanceUID=d,
                                           SOPInstanceUID=bad.sop)) == []
    # kept: export reads it, the identical object sent again stays in quarantine
    (kept,) = list(v.archive.locate(sop_uid=bad.sop))
    assert v.archive.read(kept) == bad.raw
    assert v.archive.store(bad.raw).status is StoreStatus.DUPLICATE
    assert [q.sop_uid for q in remover.quarantined()] == [bad.sop]
    assert remover.quarantined()[0].reason == "VR US dans le nom"

    # everything of a study in quarantine: the study, series and patient are hidden too
    remover.quarantine(good.sop, "second", actor="admin-test")
    assert found(v, "STUDY", StudyInstanceUID=s3) == []
    assert found(v, "SERIES", StudyInstanceUID=s3, SeriesInstanceUID="") == []
    assert found(v, "PATIENT", root="PATIENT", PatientID="PVRM03") == []
    assert len(found(v, "PATIENT", root="PATIENT", PatientID="PVRM04")) == 1
    assert engine.instances("STUDY", ident(StudyInstanceUID=s3)) == []

    # released: visible again, header back to the first instance's
    remover.release(bad.sop, "fixed", actor="admin-test")
    remover.release(good.sop, "fixed", actor="admin-test")
    assert uids(found(v, "STUDY", StudyInstanceUID=s3, InstitutionName=""), inst) == {
        "BROKEN"}
    assert len(engine.instances("STUDY", ident(StudyInstanceUID=s3))) == 2
    actions = [r["action"] for r in events(vault)
               if str(r["action"]).startswith("object.")]
    assert actions == ["object.quarantined"] * 2 + ["object.released"] * 2

    # deleting a quarantined instance works like any other
    remover.quarantine(bad.sop, "bad", actor="admin-test")
    done = remover.delete("instance", bad.sop, "bad", actor="admin-test")
    assert done.plan.quarantined == 1 and remover.quarantined() == []


def test_index_of_an_older_vault_gains_the_new_column_at_open(vault: VaultDir,
                                                              backend: Backend) -> None:
    if backend.is_postgres:
        pytest.skip("SQLite's legacy upgrade path: a PostgreSQL index starts versioned")
    v = vault.open()
    try:
        store(v, make("PVRM05", generate_uid(), generate_uid()))
        with v.engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ix_instances_quarantined")
            conn.exec_driver_sql("ALTER TABLE instances DROP COLUMN quarantined")
            conn.exec_driver_sql("DROP TABLE object_actions")
            conn.exec_driver_sql("DROP TABLE alembic_version")  # from before versions
    finally:
        v.close()
    v = vault.open()
    try:
        with v.engine.connect() as conn:
            columns = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(instances)")}
        assert "quarantined" in columns
        assert len(found(v, "STUDY", PatientID="PVRM05")) == 1
        assert Remover(v.engine, v.objects, v.recorder).recent() == []
    finally:
        v.close()


# --- the command line while the server runs ----------------------------------------------------


@pytest.mark.slow
def test_cli_delete_while_the_server_runs_and_caches_the_study(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    vault.add_node("MODALITY")
    study, series = generate_uid(), generate_uid()
    first = [make("PVRM06", study, series, number=n) for n in (1, 2)]
    late = make("PVRM06", study, series, number=3)
    paths = []
    for n, o in enumerate([*first, late]):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(o.raw)
        paths.append(path)
    server = start_server(vault)
    try:
        sent = storescu(server.port, paths[:2], calling="MODALITY")
        assert sent.returncode == 0, sent.stderr
        # no confirmation, nothing deleted
        refused = vault.cli("study", "delete", study, "--reason", REASON, check=False,
                            input="no\n")
        assert refused.returncode == 1 and "Nothing was deleted" in refused.stderr
        assert "2 instance(s)" in refused.stderr and "data key is destroyed" in refused.stderr
        missing = vault.cli("study", "delete", study, check=False)  # --reason required
        assert missing.returncode == 2
        done = vault.cli("study", "delete", study, "--reason", REASON, "--yes")
        assert "Deleted 2 instance(s)" in done.stderr and "destroyed" in done.stderr
        # the server had the study, its rows and its (now destroyed) key in its caches
        again = storescu(server.port, [paths[2]], calling="MODALITY")
        assert again.returncode == 0, again.stderr
        assert server.alive()
    finally:
        server.stop()
    assert "Traceback" not in server.log()
    v = vault.open()
    try:
        items = list(v.archive.locate(study_uid=study))
        assert [i.sop_uid for i in items] == [late.sop]
        # decrypts: a live key, not the destroyed one (group 0002 is rebuilt at reception)
        assert dcmread(io.BytesIO(v.archive.read(items[0]))).SOPInstanceUID == late.sop
        with v.sessions() as s:
            destroyed = s.scalars(select(DataKey).where(DataKey.wrapped.is_(None))).all()
            assert len(destroyed) == 1 and str(items[0].key_id) != destroyed[0].key_id
            study_row = s.scalar(select(Study).where(Study.study_uid == study))
            assert study_row is not None and study_row.num_instances == 1
        assert list(v.archive.locate(sop_uid=first[0].sop)) == []
    finally:
        v.close()
    # the deletion is in the trail, by the local administrator
    (record,) = events(vault, "object.deleted")
    assert record["user"] == "local-admin" and record["via"] == "cli"


def test_cli_quarantine_list_release_and_export(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    o = make("PVRM07", generate_uid(), generate_uid())
    v = vault.open()
    try:
        store(v, o)
    finally:
        v.close()
    assert vault.cli("instance", "quarantine", o.sop, check=False).returncode == 2
    vault.cli("instance", "quarantine", o.sop, "--reason", "bad VR")
    listed = vault.cli("instance", "quarantined")
    assert o.sop in listed.stdout and "bad VR" in listed.stdout
    out = tmp_path / "out"
    vault.cli("export", "--instance", o.sop, "--out", out)
    (written,) = list(out.rglob("*.dcm"))
    assert dcmread(written).SOPInstanceUID == o.sop
    vault.cli("instance", "unquarantine", o.sop, "--reason", "checked")
    assert "No instance" in vault.cli("instance", "quarantined").stderr
    unknown = vault.cli("series", "delete", "1.2.3.4", "--reason", "x", "--yes", check=False)
    assert unknown.returncode == 2 and "no such series" in unknown.stderr


# --- the admin page ----------------------------------------------------------------------------


PASSWORD = "radio-du-matin-sur-la-plage"


def _form(html: str, form_id: str) -> dict[str, str]:
    start = html.index(f'id="{form_id}"')
    end = html.index("</form>", start)
    import re

    fields = dict(re.findall(r'<input type="hidden" name="([a-z]+)" value="([^"]*)"',
                             html[start:end]))
    return fields


def test_admin_page_finds_deletes_and_quarantines(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    study, series = generate_uid(), generate_uid()
    o1, o2 = make("PVRM08", study, series), make("PVRM08", study, series, number=2)
    with local_web(vault, FakeClock()) as web:
        store(web.vault, o1, o2)
        web.accounts.add_user("chief", ["admin"], PASSWORD)
        web.accounts.add_user("drmartin", ["physician"], PASSWORD)
        admin, doctor = web.browser(), web.browser()
        try:
            web.sign_in(admin, "chief", PASSWORD)
            web.sign_in(doctor, "drmartin", PASSWORD)
            page = admin.get("/admin/objects")
            assert page.status_code == 200 and 'aria-current="page"' in page.text

            # other roles: refused
            assert doctor.get("/admin/objects").status_code == 403
            doctor_csrf = csrf_of(doctor.get("/account").text)
            res = doctor.post("/admin/objects/delete", data={
                "csrf": doctor_csrf, "level": "study", "uid": study, "reason": "x",
                "instances": "2", "confirm": "1"})
            assert res.status_code == 403

            # find, then quarantine an instance
            page = admin.get("/admin/objects", params={"level": "instance", "uid": o1.sop})
            assert page.status_code == 200 and 'id="quarantine-object"' in page.text
            assert "PVRM08" not in page.text and "Removal^" not in page.text  # no patient
            fields = _form(page.text, "quarantine-object")
            res = admin.post("/admin/objects/quarantine", data={**fields, "reason": "bad VR"})
            assert res.status_code == 303, res.text
            page = admin.get(res.headers["location"])
            assert 'id="quarantined"' in page.text and o1.sop in page.text
            assert "bad VR" in page.text and 'id="message"' in page.text
            assert admin.get("/admin/objects", params={"level": "study", "uid": "9.9.9"}
                             ).status_code == 404
            # released again from its page; the page speaks French too
            page = admin.get("/admin/objects", params={"level": "instance", "uid": o1.sop},
                             headers={"accept-language": "fr-FR,fr;q=0.9"})
            assert "Sortir de quarantaine" in page.text and "Retirer des images" in page.text
            res = admin.post("/admin/objects/release", data={
                **_form(page.text, "release-object"), "reason": "vérifié"})
            assert res.status_code == 303, res.text
            assert "Aucune image" not in page.text
            assert 'id="quarantine-object"' in admin.get(
                "/admin/objects", params={"level": "instance", "uid": o1.sop}).text
            res = admin.post("/admin/objects/quarantine", data={**fields, "reason": "again"})
            assert res.status_code == 303

            # delete the study: confirmation and the counts seen are required
            page = admin.get("/admin/objects", params={"level": "study", "uid": study})
            assert 'id="shred-warning"' in page.text
            fields = _form(page.text, "delete-object")
            assert fields["instances"] == "2" and fields["shred"] == "1"
            res = admin.post("/admin/objects/delete", data={**fields, "reason": REASON})
            assert res.status_code == 400  # not confirmed
            res = admin.post("/admin/objects/delete", data={
                **fields, "instances": "1", "reason": REASON, "confirm": "1"})
            assert res.status_code == 409  # not what the admin saw
            res = admin.post("/admin/objects/delete", data={
                **fields, "reason": "", "confirm": "1"})
            assert res.status_code == 400  # no reason
            assert len(list(web.vault.archive.locate(study_uid=study))) == 2
            res = admin.post("/admin/objects/delete", data={
                **fields, "reason": REASON, "confirm": "1"})
            assert res.status_code == 303, res.text
            page = admin.get(res.headers["location"])
            assert 'id="recent"' in page.text and "mauvais patient" in page.text
            assert list(web.vault.archive.locate(study_uid=study)) == []
            # without CSRF: refused
            res = admin.post("/admin/objects/delete", data={**fields, "csrf": "x",
                                                            "reason": "r", "confirm": "1"})
            assert res.status_code == 403
        finally:
            admin.close()
            doctor.close()
    records = events(vault, "object.deleted")
    assert len(records) == 1 and records[0]["user"] == "chief"
    assert records[0]["via"] == "web" and records[0]["address"] == "127.0.0.1"
    assert json.dumps(records[0]).count(o1.sop) == 1  # in the (sealed) references only


def test_deletions_racing_stores_never_index_under_a_destroyed_key(vault: VaultDir,
                                                                   opened: Any) -> None:
    """One thread keeps storing images of a study while another keeps deleting the study
    (crypto-shredding its patient each time): every store either succeeds or is redone,
    and whatever is left indexed afterwards is readable (live key, file present), with no
    file left that the index does not name."""
    import threading
    import time

    from pacsvault.storage.archive import StaleChoice

    v = opened
    study, series = generate_uid(), generate_uid()
    objs = [make("PVRM09", study, series, number=n) for n in range(40)]
    store(v, objs[0])
    remover = Remover(v.engine, v.objects, v.recorder, v.archive)
    errors: list[BaseException] = []
    stale = 0
    deleted = 0
    done = threading.Event()

    def sent() -> Iterator[Any]:
        """The 39 images, then more until the deleter has raced them twice: a faster
        store path once ended the 39 before a second deletion (a race not exercised)."""
        yield from objs[1:]
        for n in range(40, 400):
            if deleted >= 2:
                return
            yield make("PVRM09", study, series, number=n)

    def storing() -> None:
        nonlocal stale
        try:
            for o in sent():
                try:
                    v.archive.store(o.raw, source_ae="TEST")
                except StaleChoice:
                    stale += 1  # three removals in a row raced it: a failure status, honest
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def deleting() -> None:
        nonlocal deleted
        try:
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    remover.delete("study", study, "race", actor="admin-test")
                    deleted += 1
                except NotFound:
                    pass
                time.sleep(0.01)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=storing), threading.Thread(target=deleting)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    v.archive.settle()
    assert not errors, errors
    assert deleted >= 2 and stale <= 3
    left = list(v.archive.locate(study_uid=study))
    for item in left:  # readable: never indexed under a destroyed key
        assert dcmread(io.BytesIO(v.archive.read(item))).StudyInstanceUID == study
    on_disk = {p.stem for p in (vault.data / "objects").glob("??/??/*.pvo")}
    assert on_disk == {i.object_id for i in left}


def test_atna_messages_say_delete_and_update() -> None:
    """PS3.15 A.5.3.3 "DICOM Instances Accessed": D for a deletion, U for quarantine."""
    from pacsvault.audit import AuditEvent, Outcome
    from pacsvault.audit.atna import AuditMessageBuilder

    builder = AuditMessageBuilder("PACSVAULT", hostname="archive")
    for action, code in (("object.deleted", "D"), ("object.quarantined", "U"),
                         ("object.released", "U")):
        xml = builder.to_bytes(AuditEvent(action=action, outcome=Outcome.SUCCESS,
                                          code=EventCode.INSTANCES_ACCESSED,
                                          actor_user="admin", study_uids=("1.2.3",)))
        assert f'EventActionCode="{code}"'.encode() in xml, (action, xml[:300])
        assert b'csd-code="110103"' in xml


def test_a_key_destroyed_between_choice_and_encryption_makes_the_store_redo(
        opened: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving behind a flaky race above, made deterministic: a removal destroys
    the patient's data key after the store chose it and before it encrypts with it. The
    store is redone under a new key (never a KeyDestroyed escaping to the modality)."""
    v = opened
    study, series = generate_uid(), generate_uid()
    first, second = make("PVRM10", study, series), make("PVRM10", study, series, number=2)
    store(v, first)
    remover = Remover(v.engine, v.objects, v.recorder, v.archive)
    real_stage = v.archive._stage
    raced: list[bool] = []

    def removal_then_stage(raw: bytes, key_id: uuid.UUID, sop_uid: str) -> Any:
        if not raced:  # the key was chosen (from the study cache or the rows) already
            raced.append(True)
            remover.delete("study", study, "race", actor="admin-test")
        return real_stage(raw, key_id, sop_uid)

    monkeypatch.setattr(v.archive, "_stage", removal_then_stage)
    result = v.archive.store(second.raw, source_ae="TEST")
    v.archive.settle()
    assert raced and result.status is StoreStatus.STORED
    left = list(v.archive.locate(study_uid=study))
    assert [str(dcmread(io.BytesIO(v.archive.read(i))).SOPInstanceUID) for i in left] == [
        second.sop]
