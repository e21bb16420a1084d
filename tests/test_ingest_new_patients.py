"""Stores of patients first seen (issue 17, ingest): no transaction of their own.

A patient not in the index gets a data key *minted* in memory; the key's row and the
patient's are written by the group commit that writes the instance (``Archive._choose``,
``rows.index_one``). What must hold: every acknowledged instance is readable with its
own key and byte-identical; concurrent stores of one new patient give one patient row
(and share the minted key in this process); a failed commit leaves no key row behind;
and after ``kill -9`` every acknowledged one-instance study is there.

The in-process tests run on both indexes (issue 16, scale-out ingest: PostgreSQL takes
the same read-only key choice and group commit, the batch's rows in one go); two archives
over one PostgreSQL database minting for the same new patient at once give one patient
row, and a first image of a study costs one read before its commit.
"""

from __future__ import annotations

import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacsvault import config
from pacsvault.audit.events import AuditUnavailable
from pacsvault.index.models import DataKey, Instance, Patient
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault, create
from tests import corpus
from tests.harness.postgres import PostgresServer, create_database
from tests.helpers import AE, dcmtk, dcmtk_env, make_vault, start_server


def _pg_vault(root: Path, server: PostgresServer) -> Path:
    """A vault on a fresh database of ``server`` (objects in local files); its data dir."""
    db = create_database(server)
    create(root / "data", key_file=root / "key",
           index=config.IndexSettings(url=db.url, password_file=str(server.password_file)))
    return root / "data"


@pytest.fixture(scope="module", params=[
    "embedded", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])])
def vault(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    root = tmp_path_factory.mktemp("newpatients")
    if request.param == "postgres":
        _pg_vault(root, request.getfixturevalue("postgres_server"))
    else:
        create(root / "data", key_file=root / "key")
    opened = Vault.open(root / "data", root / "key")
    yield opened
    opened.close()


def _one_instance_studies(tmp: Path, count: int, *, patient: str | None = None,
                          same_study: bool = False) -> list[bytes]:
    """``count`` images, each its own patient (or all of ``patient``; one study if
    ``same_study``), as bytes."""
    files = corpus.synthetic_ct_series(tmp, count, size=16)
    study = generate_uid()
    out = []
    for i, f in enumerate(files):
        ds = dcmread(f)
        ds.PatientID = patient or f"NEW{generate_uid()[-12:]}{i}"
        ds.PatientName = f"NEW^{ds.PatientID}"
        ds.StudyInstanceUID = study if same_study else generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.save_as(f, enforce_file_format=True)
        out.append(f.read_bytes())
    return out


def _read_back(vault: Vault, sop_uid: str) -> bytes:
    (item,) = list(vault.archive.locate(sop_uid=sop_uid))
    return vault.archive.read(item)


def test_concurrent_new_patients_each_get_their_rows_and_read_back(
        vault: Vault, tmp_path: Path) -> None:
    raws = _one_instance_studies(tmp_path / "many", 12)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda r: vault.archive.store(r, source_ae="M"), raws))
    assert all(r.status is StoreStatus.STORED for r in results)
    for raw, result in zip(raws, results, strict=True):
        assert _read_back(vault, result.sop_uid) == raw
    with vault.sessions() as session:
        ids = [dcmread_id(r) for r in raws]
        patients = session.scalars(select(Patient).where(Patient.patient_id.in_(ids))).all()
        assert len(patients) == len(raws)
        for patient in patients:  # each patient's key row exists and is the one used
            assert session.get(DataKey, patient.key_id) is not None
        keys = set(session.scalars(select(Instance.key_id).where(
            Instance.sop_uid.in_([r.sop_uid for r in results]))))
        assert keys == {p.key_id for p in patients}


def dcmread_id(raw: bytes) -> str:
    import io
    return str(dcmread(io.BytesIO(raw), stop_before_pixels=True).PatientID)


def test_one_new_patient_on_several_threads_is_one_patient(
        vault: Vault, tmp_path: Path) -> None:
    raws = _one_instance_studies(tmp_path / "one", 8, patient="SAMEPATIENT17",
                                 same_study=True)
    start = threading.Barrier(4)

    def send(part: list[bytes]) -> list[StoreStatus]:
        start.wait(10)
        return [vault.archive.store(r, source_ae="M").status for r in part]

    with ThreadPoolExecutor(4) as pool:
        statuses = [s for part in pool.map(send, [raws[k::4] for k in range(4)])
                    for s in part]
    assert statuses == [StoreStatus.STORED] * len(raws)
    with vault.sessions() as session:
        count = session.scalar(select(func.count()).select_from(Patient)
                               .where(Patient.patient_id == "SAMEPATIENT17"))
        assert count == 1
        used = set(session.scalars(select(Instance.key_id)
                                   .where(Instance.sop_uid.in_(
                                       [_sop(r) for r in raws]))))
        # One key in the usual case (the minted key is shared until its commit); a store
        # that looked before that commit and minted after it adds one more, never more
        # keys than images, and every one of them has its row.
        assert 1 <= len(used) <= len(raws)
        assert all(session.get(DataKey, k) is not None for k in used)
    for raw in raws:
        assert _read_back(vault, _sop(raw)) == raw


def _sop(raw: bytes) -> str:
    import io
    return str(dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID)


def test_a_refused_commit_leaves_no_key_and_no_patient(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (raw,) = _one_instance_studies(tmp_path / "refused", 1, patient="REFUSED17")
    journal = vault.archive.journal
    assert journal is not None

    def unavailable(*_a: Any, **_k: Any) -> Any:
        raise AuditUnavailable("test: the trail cannot be written")

    with vault.sessions() as session:
        keys_before = session.scalar(select(func.count()).select_from(DataKey))
    monkeypatch.setattr(journal, "batch", unavailable)
    with pytest.raises(AuditUnavailable):
        vault.archive.store(raw, source_ae="M")
    monkeypatch.undo()
    with vault.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DataKey)) == keys_before
        assert session.scalar(select(Patient.pk).where(
            Patient.patient_id == "REFUSED17")) is None
    # nothing half-done: the same image is stored normally afterwards
    assert vault.archive.store(raw, source_ae="M").status is StoreStatus.STORED
    assert _read_back(vault, _sop(raw)) == raw


def _dataset_bytes(raw: bytes) -> bytes:
    """Everything after the preamble and the file meta group (0002)."""
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", raw[140:144])  # value of (0002,0000) UL
    return raw[144 + group_len:]


SENDING = "I: Sending file: "
STORED = "I: Received Store Response (Success)"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_during_new_patient_stores_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Two associations of one-instance studies (every image a new patient: the minted
    key path throughout); kill -9 once 40 are acknowledged; every acknowledged image is
    in the vault after the restart, byte-identical."""
    vault = make_vault(tmp_path / "vault")
    vault.add_node("MODALITY")
    files = []
    for k, raw in enumerate(_one_instance_studies(tmp_path / "src", 160)):
        path = tmp_path / "send" / f"{k:04d}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(raw)
        files.append(path)
    server = start_server(vault)
    acked: list[Path] = []
    lock = threading.Lock()
    done = threading.Event()

    def push(part: list[Path]) -> None:
        proc = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec", AE, "127.0.0.1",
             str(server.port), *map(str, part)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
        assert proc.stdout is not None
        sending: Path | None = None
        try:
            for line in proc.stdout:
                line = line.strip()
                if line.startswith(SENDING):
                    sending = Path(line[len(SENDING):])
                elif line.startswith(STORED) and sending is not None:
                    with lock:
                        acked.append(sending)
                        if len(acked) >= 40:
                            done.set()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    threads = [threading.Thread(target=push, args=(files[k::2],)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        assert done.wait(150), "fewer than 40 stores acknowledged"
        time.sleep(0.005)
        server.kill9()
        for t in threads:
            t.join(60)
    finally:
        if server.alive():
            server.kill9()
    with lock:
        acknowledged = list(acked)
    assert 40 <= len(acknowledged) < len(files)

    server = start_server(vault, log_name="serve-after-crash.log")
    try:
        opened = vault.open()
        try:
            for path in acknowledged:  # the dataset as sent (the file meta is rebuilt)
                raw = path.read_bytes()
                back = _read_back(opened, _sop(raw))
                assert _dataset_bytes(back) == _dataset_bytes(raw), path.name
            with opened.sessions() as session:
                # every key an instance names has its row; no patient without a key row
                assert session.scalar(
                    select(func.count()).select_from(Instance)
                    .where(Instance.key_id.not_in(select(DataKey.key_id)))) == 0
                assert session.scalar(
                    select(func.count()).select_from(Patient)
                    .where(Patient.key_id.not_in(select(DataKey.key_id)))) == 0
        finally:
            opened.close()
    finally:
        assert server.stop() == 0


# --- PostgreSQL: several archives over one index ------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_two_archives_minting_for_one_new_patient_give_one_patient_row(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    """Two ``Vault`` objects over one database (two instances: separate minted keys,
    separate in-process locks) store studies of the same new patients at the same
    moment: one patient row each, every image readable under its own key's row, and
    the same bytes sent to both are stored once (the other a duplicate)."""
    data = _pg_vault(tmp_path / "v", postgres_server)
    raws = []
    for k in range(3):  # three new patients, two studies each (one per instance)
        raws += _one_instance_studies(tmp_path / f"p{k}", 2, patient=f"TWICE17P{k}")
    a, b = Vault.open(data, tmp_path / "v" / "key"), Vault.open(data, tmp_path / "v" / "key")
    try:
        start = threading.Barrier(2)

        def send(archive: Any, part: list[bytes]) -> list[StoreStatus]:
            start.wait(10)
            return [archive.store(r, source_ae="M").status for r in part]

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(send, (a.archive, b.archive), (raws[0::2], raws[1::2])))
        assert [s for part in got for s in part] == [StoreStatus.STORED] * len(raws)
        again = [raws[0], raws[0]]
        with ThreadPoolExecutor(2) as pool:
            twice = list(pool.map(send, (a.archive, b.archive), ([again[0]], [again[1]])))
        assert sorted(s.value for part in twice for s in part) == ["duplicate", "duplicate"]
        with a.sessions() as session:
            for k in range(3):
                assert session.scalar(select(func.count()).select_from(Patient).where(
                    Patient.patient_id == f"TWICE17P{k}")) == 1
            used = set(session.scalars(select(Instance.key_id)))
            assert all(session.get(DataKey, key) is not None for key in used)
            assert session.scalar(select(func.count()).select_from(Instance)) == len(raws)
        for raw in raws:
            assert _read_back(b, _sop(raw)) == raw
    finally:
        a.close()
        b.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_study_not_cached_costs_one_read_and_a_batch_a_few_statements(
        tmp_path: Path, postgres_server: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Round trips per store on PostgreSQL (each one made while a batch holds the index's
    write lock counts for every instance): a new patient's first image is chosen by one
    statement outside any transaction (no key or patient row of its own: the batch
    writes them), and a batch writes its images' rows in one INSERT."""
    data = _pg_vault(tmp_path / "v", postgres_server)
    vault = Vault.open(data, tmp_path / "v" / "key")
    statements: list[str] = []
    import psycopg

    # Counted at the driver: the key choice and the batch's rows go straight to psycopg
    # (``storage.keychoice``, ``storage.pgrows``, as the trail record's), so SQLAlchemy's
    # events would not see them; the pool's pre-ping (";") is left out.
    for name in ("execute", "executemany"):
        original = getattr(psycopg.Cursor, name)

        def counted_call(cursor: Any, query: Any, *rest: Any, _o: Any = original,
                         **kw: Any) -> Any:
            text = " ".join(str(query).split())
            if text != ";":
                statements.append(text)
            return _o(cursor, query, *rest, **kw)

        monkeypatch.setattr(psycopg.Cursor, name, counted_call)
    try:
        (first,) = _one_instance_studies(tmp_path / "warm", 1)
        vault.archive.store(first, source_ae="M")  # connections and the trail made
        statements.clear()
        choose = vault.archive._choose
        chosen: list[int] = []

        def counted(parsed: Any) -> Any:
            before = len(statements)
            try:
                return choose(parsed)
            finally:
                chosen.append(len(statements) - before)

        vault.archive._choose = counted  # type: ignore[method-assign]
        (raw,) = _one_instance_studies(tmp_path / "new", 1)
        assert vault.archive.store(raw, source_ae="M").status is StoreStatus.STORED
        assert chosen == [1]  # plus the pool's ping; no BEGIN, no lock, no commit
        assert not any("INSERT" in s or "UPDATE" in s for s in statements[:1])
        series = corpus.synthetic_ct_series(tmp_path / "ct", 12, size=16)
        vault.archive.store(series[0].read_bytes(), source_ae="M")  # study now cached
        statements.clear()
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda p: vault.archive.store(p.read_bytes(),
                                                               source_ae="M"), series[1:]))
        assert all(r.status is StoreStatus.STORED for r in done)
        inserts = [s for s in statements if "INSERT INTO instances" in s]
        # one INSERT per batch (never more than one per image), and no per-image
        # statement: per batch the lock, the generation with the known UIDs, the
        # instance rows with their counters (series, study), and the trail's record
        assert 1 <= len(inserts) <= len(done)
        assert len(statements) <= 8 * len(inserts), statements
    finally:
        monkeypatch.undo()
        vault.close()
