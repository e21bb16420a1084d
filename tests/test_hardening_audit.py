"""Issue 11, audit completeness: no access slips past the trail.

- defect 7: the trail on a full tmpfs: C-FIND, C-STORE and QIDO are refused (no answer,
  no acknowledgement) instead of served unrecorded, a CRITICAL line is logged; once space
  is back the torn last line is described by a signed ``repair`` record and the chain
  verifies again;
- defect 8: kill -9 in the middle of a storescu batch: every acknowledged image is named
  by a store record (recorded per committed batch, with the index rows);
- defect 15a: a C-MOVE to a registered but unreachable destination leaves a ``dicom.move``
  failure record;
- defect 15b: ``audit show --patient X`` shows X's own references only, ``--study S``
  only those of S's patient;
- fail-closed export: ``pacsvault export`` records (durably) before writing any file, and
  writes nothing when the trail cannot take the record.

(Running tamper detection, defect 12, is in ``test_audit_tamper_live.py``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE as ClientAE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsvault.audit.query import own_refs, refs_for_study
from tests import corpus
from tests.harness.webhook import Webhook
from tests.helpers import (
    AE,
    VaultDir,
    dcmtk,
    dcmtk_env,
    events,
    free_port,
    make_vault,
    start_server,
    storescu,
)
from tests.web_helpers import write_secret

LOCAL = "127.0.0.1"
MODALITY, QR = "MODALITY", "QRNODE"
PHYS, PHYS_PW = "drmartin", "quiet-harbour-lantern-47-violet-orchard"
A700, PENDING = 0xA700, (0xFF00, 0xFF01)


def _ct(out: Path, patient_id: str, name: str, seed: int) -> Path:
    """One small CT of its own study, for the given patient."""
    (path,) = corpus.synthetic_ct_series(out / patient_id, 1, seed=seed, size=16)
    ds = dcmread(path)
    ds.PatientID, ds.PatientName = patient_id, name
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def _find(port: int, **keys: str) -> tuple[list[Dataset], int]:
    """C-FIND at STUDY level; (answers, final status) — status -1: no response."""
    ae = ClientAE(ae_title=QR)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(LOCAL, port, ae_title=AE)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = ""
    identifier.PatientID = ""
    identifier.StudyInstanceUID = ""
    for key, value in keys.items():
        setattr(identifier, key, value)
    answers: list[Dataset] = []
    final = -1
    try:
        for status, ds in assoc.send_c_find(identifier,
                                            StudyRootQueryRetrieveInformationModelFind):
            if not status:
                break
            if status.Status in PENDING:
                answers.append(cast(Dataset, ds))
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return answers, final


def _store(port: int, path: Path) -> int:
    ae = ClientAE(ae_title=MODALITY)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOCAL, port, ae_title=AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dcmread(path))
        return int(status.Status) if status else -1
    finally:
        assoc.release()


# === defect 7: fail closed on a full disk ===============================================


@pytest.fixture
def small_audit_fs(tmp_path: Path) -> Iterator[tuple[VaultDir, Path]]:
    """A vault whose ``audit/`` directory is a real 1 MiB tmpfs (root only)."""
    vault = make_vault(tmp_path / "v")
    audit = vault.data / "audit"
    keep = tmp_path / "audit-before"
    shutil.copytree(audit, keep)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                              str(audit)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        for item in keep.iterdir():
            shutil.copy2(item, audit / item.name)
        yield vault, audit
    finally:
        subprocess.run(["umount", "-l", str(audit)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Take every free block of the file system ``directory`` is on."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096) > 0:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_full_trail_disk_refuses_access_then_repairs(
    small_audit_fs: tuple[VaultDir, Path], hook: Webhook, tmp_path: Path
) -> None:
    vault, audit = small_audit_fs
    vault.set_toml("alerts", "webhook_url", json.dumps(hook.url))
    vault.set_toml("alerts", "webhook_allow_http_loopback", "true")
    vault.add_node(MODALITY)
    vault.add_node(QR, "--roles", "store,query,retrieve")
    vault.cli("user", "add", PHYS, "--role", "physician", "--password-file",
              write_secret(tmp_path / "phys.pw", PHYS_PW))
    first = _ct(tmp_path / "ct", "PVFULL01", "Quetzal^Bartholomew", 1)
    server = start_server(vault)
    try:
        assert storescu(server.port, [first], calling=MODALITY).returncode == 0
        answers, final = _find(server.port)
        assert final == 0 and len(answers) == 1
        v = vault.open()
        try:
            token = v.accounts.create_token(PHYS, "1d").token
        finally:
            v.close()
        session = requests.Session()
        session.trust_env = False
        session.verify = str(vault.data / "tls" / "ca.crt")
        session.headers["Authorization"] = f"Bearer {token}"
        qido = f"https://{LOCAL}:{server.https_port}/dicom-web/studies"
        assert session.get(qido, timeout=30).status_code == 200
        finds_before = len(events(vault, "dicom.find"))

        filler = _fill(audit)
        # The trail's last page may still hold a few records: query until the first
        # record that does not fit. From then on nothing is answered.
        for _ in range(40):
            answers, final = _find(server.port)
            if final != 0:
                break
            assert len(answers) == 1  # served, and (asserted below) recorded
        assert final == A700, final
        assert answers == [], "patient data left with no record of the query"
        # dcmtk's findscu gets no answer either
        out = tmp_path / "findscu"
        out.mkdir()
        res = subprocess.run(
            [dcmtk("findscu"), "-v", "-S", "-aet", QR, "-aec", AE, "-X", "-od", str(out),
             "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName", "-k", "StudyInstanceUID",
             LOCAL, str(server.port)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert list(out.iterdir()) == [], res.stdout + res.stderr
        assert "Final Find Response (Refused: OutOfResources)" in res.stdout + res.stderr, (
            res.stdout + res.stderr)
        # QIDO: 503, no patient name in the body
        refused = session.get(qido, timeout=30)
        assert refused.status_code == 503, refused.text
        assert "Quetzal" not in refused.text
        # C-STORE: refused with A700, never acknowledged
        second = _ct(tmp_path / "ct", "PVFULL02", "Zorglub^Helene", 2)
        assert _store(server.port, second) == A700
        session.close()
        assert "AUDIT TRAIL UNWRITABLE" in server.log()
        assert "CRITICAL" in server.log()
        # the practice is told without the disk: the alert goes out by webhook
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                b["rule"] == "audit-unwritable" for b in hook.bodies):
            time.sleep(0.2)
        (alert, *_) = [b for b in hook.bodies if b["rule"] == "audit-unwritable"]
        assert alert["severity"] == "critical" and "Quetzal" not in json.dumps(alert)
    finally:
        server.stop()

    # Every answer that left has its record (none was served unrecorded).
    filler.unlink()
    v = vault.open()
    try:
        records = list(v.audit.records())
        served_finds = [r for r in records if r.action == "dicom.find"]
        assert len(served_finds) >= finds_before
        assert all(r.detail.get("matches") == 1 for r in served_finds)
        assert not any(second.name in str(r.raw) for r in records)
        verdict = v.audit.verify()
    finally:
        v.close()
    # the cut write is reported, not silently tolerated ...
    assert not verdict.ok and "incomplete write" in verdict.problem, verdict
    # ... and repaired by a signed record that says what was cut
    res = vault.cli("audit", "repair")
    assert "repair record" in res.stdout and "SHA-256" in res.stdout, res.stdout
    lines = (audit / "trail.jsonl").read_bytes().split(b"\n")
    repair = next(json.loads(line) for line in reversed(lines)
                  if line.startswith(b"{") and b'"kind":"repair"' in line)
    assert repair["detail"]["cut_bytes"] > 0 and len(repair["detail"]["cut_sha256"]) == 64
    assert repair["detail"]["records_lost"] == 0
    ok = vault.cli("audit", "verify")
    assert "audit trail intact" in ok.stdout, ok.stdout
    # the instance refused for want of a record was never stored
    status = json.loads(vault.cli("status", "--json").stdout)
    assert status["counts"]["instances"] == 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_export_is_recorded_before_any_file_and_refused_without_a_trail(
    small_audit_fs: tuple[VaultDir, Path], tmp_path: Path
) -> None:
    """``pacsvault export`` writes plaintext only once its record is durable: with the
    trail's disk full it exits 2 with one line and writes nothing."""
    vault, audit = small_audit_fs
    ct = _ct(tmp_path / "ct", "PVEXP01", "Quetzal^Bartholomew", 8)
    study, sop = (str(getattr(dcmread(ct), k)) for k in ("StudyInstanceUID",
                                                         "SOPInstanceUID"))
    v = vault.open()
    try:
        v.archive.store(ct.read_bytes(), source_ae="TEST")
    finally:
        v.close()

    out = tmp_path / "ok"
    vault.cli("export", "--study", study, "--out", out)
    assert len(list(out.rglob("*.dcm"))) == 1
    (record,) = events(vault, "export")
    assert record["study_uids"] == [study] and record["sop_uids"] == [sop]
    assert record["patient_ids"] == ["PVEXP01"] and record["instances"] == 1

    filler = _fill(audit)
    # The trail's last page may still take a record or two: every export that writes
    # files must have its record; from the first that does not fit, nothing is written.
    exported = 1
    for attempt in range(20):
        target = tmp_path / f"full{attempt}"
        res = vault.cli("export", "--study", study, "--out", target, check=False)
        if res.returncode != 0:
            break
        exported += 1
        assert len(list(target.rglob("*.dcm"))) == 1
    assert res.returncode == 2, res.stdout + res.stderr
    assert not target.exists(), "files written with no durable record of the export"
    # one error line (the lines before it are the recorder's CRITICAL alarm, by design)
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert errors == res.stderr.strip().splitlines()[-1:], res.stderr
    assert "audit trail" in errors[0] and "Traceback" not in res.stderr, res.stderr
    assert "Quetzal" not in res.stderr + res.stdout and "PVEXP01" not in res.stderr

    filler.unlink()
    vault.cli("audit", "repair", check=False)  # the refused write may have left a cut line
    assert len(events(vault, "export")) == exported


# === defect 8: stores recorded per committed batch ======================================


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_mid_batch_every_acknowledged_image_has_its_record(tmp_path: Path) -> None:
    from tests.test_crash import _push_and_kill, _sop_uid

    vault = make_vault(tmp_path / "v")
    vault.add_node("MODALITY")
    files = corpus.synthetic_ct_series(tmp_path / "ct", 150, size=64)
    server = start_server(vault)
    try:
        acked, output, _code = _push_and_kill(server.port, files, server.kill9)
    finally:
        if server.alive():
            server.kill9()
    assert acked, output
    acked_uids = {_sop_uid(f) for f in acked}
    recorded: set[str] = set()
    for record in events(vault):
        if str(record["action"]).endswith(".store.committed"):
            assert record["ae"] == "MODALITY" and record["address"] == LOCAL
            assert record["patient_ids"] == ["PVBATCH01"]
            recorded.update(record["sop_uids"])  # type: ignore[arg-type]
    missing = acked_uids - recorded
    assert not missing, f"{len(missing)} of {len(acked_uids)} acknowledged images unrecorded"
    # no association summary could be written: the per-batch records are what remains
    assert vault.cli("audit", "verify").returncode == 0


# === defect 15a: C-MOVE to an unreachable destination ===================================


def test_move_to_unreachable_destination_is_recorded(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    vault.add_node(MODALITY)
    vault.add_node(QR, "--roles", "store,query,retrieve")
    vault.cli("node", "add", "GONE", "--host", LOCAL, "--port", str(free_port()),
              "--roles", "store,retrieve")
    path = _ct(tmp_path / "ct", "PVMOVE01", "Quetzal^Bartholomew", 3)
    study = str(dcmread(path).StudyInstanceUID)
    server = start_server(vault)
    try:
        assert storescu(server.port, [path], calling=MODALITY).returncode == 0
        ae = ClientAE(ae_title=QR)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(LOCAL, server.port, ae_title=AE)
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        finals = [int(s.Status) for s, _ in assoc.send_c_move(
            identifier, "GONE", StudyRootQueryRetrieveInformationModelMove) if s]
        assoc.release()
        # registered but not answering: A702 with the failed counter, not A801 "unknown"
        # (issue 13, defect 1)
        assert finals and finals[-1] == 0xA702, finals
        deadline = time.monotonic() + 20
        moves: list[dict[str, object]] = []
        while time.monotonic() < deadline and not moves:
            moves = events(vault, "dicom.move")
            time.sleep(0.2)
    finally:
        server.stop()
    (move,) = moves
    assert move["outcome"] == "serious_failure"
    assert "could not be reached" in str(move["message"])
    assert move["destination"] == "GONE" and move["sent"] == 0 and move["requested"] == 1
    assert move["study_uids"] == [study]
    (begin,) = events(vault, "dicom.move.begin")
    assert int(str(begin["seq"])) < int(str(move["seq"]))


# === defect 15b: a patient's access request shows their own data only ====================


def test_show_patient_lists_only_that_patients_references(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    vault.add_node(MODALITY)
    vault.add_node(QR, "--roles", "store,query,retrieve")
    a = _ct(tmp_path / "ct", "PVOWN_A", "Quetzal^Bartholomew", 4)
    b = _ct(tmp_path / "ct", "PVOWN_B", "Zorglub^Helene", 5)
    study_a, study_b = (str(dcmread(p).StudyInstanceUID) for p in (a, b))
    server = start_server(vault)
    try:
        assert storescu(server.port, [a, b], calling=MODALITY).returncode == 0
        answers, final = _find(server.port)  # one query disclosing both patients
        assert final == 0 and len(answers) == 2
    finally:
        server.stop()
    (find,) = events(vault, "dicom.find")
    assert sorted(cast(list[str], find["study_uids"])) == sorted([study_a, study_b])

    def show(patient: str) -> list[dict[str, object]]:
        out = vault.cli("audit", "show", "--patient", patient, "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    for patient, own, other in (("PVOWN_A", study_a, study_b), ("PVOWN_B", study_b, study_a)):
        records = show(patient)
        (query,) = [r for r in records if r["action"] == "dicom.find"]
        assert query["study_uids"] == [own] and query["patient_ids"] == [patient]
        assert query["withheld"] == 2  # the other patient's study and ID
        text = json.dumps(records)
        assert other not in text, f"{patient}'s access request shows another patient's study"
        assert ("PVOWN_B" if patient == "PVOWN_A" else "PVOWN_A") not in text
        stored = [r for r in records if r["action"] == "dicom.store.committed"]
        assert stored and all(r["study_uids"] == [own] for r in stored)


def test_show_study_lists_only_the_owning_patients_references(tmp_path: Path) -> None:
    """``audit show --study S`` (and the auditor page's study filter, same code) matches a
    multi-patient record by S, but shows only the references of S's patient."""
    vault = make_vault(tmp_path / "v")
    vault.add_node(MODALITY)
    vault.add_node(QR, "--roles", "store,query,retrieve")
    a = _ct(tmp_path / "ct", "PVSTU_A", "Quetzal^Bartholomew", 6)
    b = _ct(tmp_path / "ct", "PVSTU_B", "Zorglub^Helene", 7)
    study_a, study_b = (str(dcmread(p).StudyInstanceUID) for p in (a, b))
    server = start_server(vault)
    try:
        assert storescu(server.port, [a, b], calling=MODALITY).returncode == 0
        answers, final = _find(server.port)  # one query disclosing both patients
        assert final == 0 and len(answers) == 2
    finally:
        server.stop()

    for study, other, owner, stranger in ((study_a, study_b, "PVSTU_A", "PVSTU_B"),
                                          (study_b, study_a, "PVSTU_B", "PVSTU_A")):
        out = vault.cli("audit", "show", "--study", study, "--json").stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        (query,) = [r for r in records if r["action"] == "dicom.find"]
        assert query["study_uids"] == [study] and query["patient_ids"] == [owner]
        assert query["withheld"] == 2  # the other patient's study and ID
        text = json.dumps(records)
        assert other not in text, "a study's trail shows another patient's study"
        assert stranger not in text


def test_study_filter_on_records_without_grouping_uses_the_index() -> None:
    """Older records: the study's owner per the index decides what is shown."""
    old = {"patient_ids": ["A", "B"], "study_uids": ["1.1", "2.2"],
           "sop_uids": ["1.1.1", "2.2.1"]}
    assert refs_for_study(old, "2.2", {"B": ({"2.2"}, {"2.2.1"})}) == {
        "patient_ids": ["B"], "study_uids": ["2.2"], "sop_uids": ["2.2.1"], "withheld": 3}
    # owner unknown to the index: only the study asked about is shown
    assert refs_for_study(old, "2.2", {}) == {
        "patient_ids": [], "study_uids": ["2.2"], "sop_uids": [], "withheld": 5}
    grouped = {**old, "patients": {"A": {"study_uids": ["1.1"], "sop_uids": ["1.1.1"]},
                                   "B": {"study_uids": ["2.2"], "sop_uids": ["2.2.1"]}}}
    assert refs_for_study(grouped, "1.1", {}) == {
        "patient_ids": ["A"], "study_uids": ["1.1"], "sop_uids": ["1.1.1"], "withheld": 3}


def test_records_without_grouping_are_cut_with_the_index() -> None:
    """Records written before references were grouped per patient: what the index says
    belongs to the patient is shown, the rest is withheld and counted."""
    old = {"patient_ids": ["A", "B"], "study_uids": ["1.1", "2.2", "3.3"],
           "sop_uids": ["1.1.1", "2.2.1"]}
    cut = own_refs(old, "A", studies={"1.1"}, sops={"1.1.1"})
    assert cut == {"patient_ids": ["A"], "study_uids": ["1.1"], "sop_uids": ["1.1.1"],
                   "withheld": 4}
    grouped = {**old, "patients": {"A": {"study_uids": ["1.1"], "sop_uids": []},
                                   "B": {"study_uids": ["2.2"], "sop_uids": ["2.2.1"]}},
               "unassigned": {"study_uids": ["3.3"], "sop_uids": []}}
    assert own_refs(grouped, "B", set(), set()) == {
        "patient_ids": ["B"], "study_uids": ["2.2"], "sop_uids": ["2.2.1"], "withheld": 4}


# === the trail's own mechanics (in-process, fast) ========================================


def _emit_some(v: object, n: int) -> None:
    from pacsvault.audit import AuditEvent, EventCode, Outcome

    for i in range(n):
        v.recorder.emit(AuditEvent(  # type: ignore[attr-defined]
            action="test.event", outcome=Outcome.SUCCESS,
            code=EventCode.APPLICATION_ACTIVITY, detail={"n": i}))


def test_a_cut_write_is_repaired_by_the_next_append_never_rewritten(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "v")
    v = vault.open()
    try:
        _emit_some(v, 3)
        trail = vault.data / "audit" / "trail.jsonl"
        before = trail.read_bytes()
        cut = b'{"action":"dicom.find","address":"127.0.0.1","ae":"QR'  # a write cut short
        with open(trail, "ab") as fh:
            fh.write(cut)
        assert not v.audit.verify().ok
        _emit_some(v, 1)  # the next append describes the cut first
        after = trail.read_bytes()
        assert after.startswith(before + cut + b"\n"), "bytes were removed or rewritten"
        records = list(v.audit.records())
        repair, event = records[-2], records[-1]
        assert repair.kind == "repair" and event.action == "test.event"
        assert repair.detail["cut_bytes"] == len(cut)
        assert repair.detail["cut_sha256"] == hashlib.sha256(cut).hexdigest()
        assert repair.detail["records_lost"] == 0
        verdict = v.audit.verify()
        assert verdict.ok, verdict
    finally:
        v.close()


def test_cutting_an_anchored_record_is_not_laundered_by_the_repair(tmp_path: Path) -> None:
    """Chopping the end of the last (acknowledged) record looks like a cut write, but the
    anchor knows that record was whole: the repair says records were lost and the trail
    keeps failing verification."""
    vault = make_vault(tmp_path / "v")
    v = vault.open()
    try:
        _emit_some(v, 3)
        trail = vault.data / "audit" / "trail.jsonl"
        data = trail.read_bytes()
        trail.write_bytes(data[:-40])
        record = v.audit.repair()
        assert record is not None and record.detail["records_lost"] == 1
        verdict = v.audit.verify()
        assert not verdict.ok and "removed" in verdict.problem, verdict
    finally:
        v.close()
