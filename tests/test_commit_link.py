"""One committer for every worker (issue 17, ``storage.commit_link``): the stores of a
worker other than 0 are committed by worker 0's group commit.

In process, two ``Vault`` objects on one data directory stand for two worker processes
(their own archives, caches, trails and SQLite connections; the socket between them is
the real Unix socket). What is shown: every store of "worker 1" goes through worker 0's
commit and ends exactly as a store of its own would (rows, bytes read back identical, one
trail that verifies and names every instance, a re-send answered as a duplicate, the
study learnt by worker 1's cache); without a committer worker 1 commits itself; a
committer failing answers with the failure's own type (the modality's status does not
depend on which process committed); a committer gone before answering fails the store
*and keeps its staged object* (the row may have been committed: the next start's
``recover`` settles it), where any other failure discards it; a removal the committer
has seen empties worker 1's caches through its answer.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from pacsvault.audit.events import AuditUnavailable
from pacsvault.dicom.status import OUT_OF_RESOURCES, store_failure
from pacsvault.dicomfile import parse
from pacsvault.service.control import short_path
from pacsvault.storage import commit_link
from pacsvault.storage.archive import StoreResult, StoreStatus
from pacsvault.storage.commit_link import CommitClient, CommitOutcomeUnknown, CommitServer
from pacsvault.storage.objects import SPARE_DIR
from pacsvault.storage.removal import Remover
from pacsvault.storage.rows import Pending
from pacsvault.vault import Vault, create
from tests import corpus

LOG = logging.getLogger("test_commit_link")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Vault, Vault]]:
    create(tmp_path / "data", key_file=tmp_path / "key")
    first = Vault.open(tmp_path / "data", tmp_path / "key")
    second = Vault.open(tmp_path / "data", tmp_path / "key")
    try:
        yield first, second
    finally:
        second.close()
        first.close()


def _raws(tmp_path: Path) -> list[bytes]:
    """A CT series of one study, and four one-instance studies of new patients."""
    files = corpus.synthetic_ct_series(tmp_path / "ct", 12, size=32)
    raws = [f.read_bytes() for f in files]
    for n, path in enumerate(files[:4]):
        ds = dcmread(path)
        ds.PatientID, ds.PatientName = f"PVLINK{n}", f"Link^Patient{n}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out = tmp_path / f"new{n}.dcm"
        ds.save_as(out, enforce_file_format=True)
        raws.append(out.read_bytes())
    return raws


def _new_patient_image(tmp_path: Path, size: int) -> bytes:
    """One image of a new study of a new patient, ``size`` x ``size`` pixels."""
    (path,) = corpus.synthetic_ct_series(tmp_path / f"big{size}", 1, size=size)
    ds = dcmread(path)
    ds.PatientID, ds.PatientName = f"PVBIG{size}", "Big^Patient"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _spares(vault: Vault) -> dict[str, int]:
    """The staged objects (non-empty spares) by id: their sizes."""
    return {p.stem: p.stat().st_size for p in (vault.layout.objects / SPARE_DIR).iterdir()
            if p.stat().st_size}


def test_stores_of_another_worker_are_committed_by_worker_0(
        pair: tuple[Vault, Vault], tmp_path: Path) -> None:
    first, second = pair
    committed: list[Pending] = []

    def commit(pending: Pending) -> None:
        committed.append(pending)
        first.archive.commit_pending(pending)

    server = CommitServer(first.layout.root, commit, first.archive.removal_generation)
    server.start()
    second.archive.link = CommitClient(first.layout.root)
    raws = _raws(tmp_path)
    results: dict[int, StoreStatus] = {}

    def send(indices: range) -> None:
        for i in indices:
            results[i] = second.archive.store(raws[i], source_ae="MODALITY").status

    try:
        threads = [threading.Thread(target=send, args=(range(k, len(raws), 4),))
                   for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == dict.fromkeys(range(len(raws)), StoreStatus.STORED)
        assert len(committed) == len(raws)  # each store went through worker 0's commit
        assert all(p.result is None and p.error is None for p in committed)
        # a re-send is answered by worker 0's rows: a duplicate, nothing new committed
        again = second.archive.store(raws[0], source_ae="MODALITY")
        assert again.status is StoreStatus.DUPLICATE
        assert committed[-1].result is not None
        # what the rows taught reached worker 1's own caches (its next store of the
        # study encrypts at once, as after a commit of its own)
        study = str(dcmread(tmp_path / "ct" / "ct0011.dcm").StudyInstanceUID)
        assert study in second.archive._study_cache
    finally:
        second.archive.settle()
        second.archive.link.close()
        server.stop()
    # read back by either worker: the bytes sent, whole
    sent = {str(dcmread(tmp_path / "ct" / "ct0000.dcm").SOPInstanceUID)}
    found = list(first.archive.locate())
    assert len(found) == len(raws)
    by_uid = {item.sop_uid: item for item in found}
    for raw in raws:
        uid = next(u for u in by_uid if u.encode() in raw)
        assert first.archive.read(by_uid[uid]) == raw
        assert second.archive.read(by_uid[uid]) == raw
    assert sent <= set(by_uid)
    # one trail, in order, naming every instance (worker 0 recorded worker 1's stores)
    assert first.audit.verify().ok
    named = {uid for r in first.audit.records() if r.action == "dicom.store.committed"
             for uid in r.refs.get("sop_uids", [])}
    assert set(by_uid) <= named
    assert not (first.layout.root / commit_link.SOCKET_NAME).exists()


def test_without_a_committer_the_worker_commits_itself(pair: tuple[Vault, Vault],
                                                      tmp_path: Path) -> None:
    _first, second = pair
    second.archive.link = CommitClient(second.layout.root)  # nothing listens there
    raw = _raws(tmp_path)[-1]
    assert second.archive.store(raw, source_ae="MODALITY").status is StoreStatus.STORED
    second.archive.settle()
    assert [second.archive.read(i) for i in second.archive.locate()] == [raw]


def test_a_committers_failure_keeps_its_type_and_discards_the_object(
        pair: tuple[Vault, Vault], tmp_path: Path) -> None:
    first, second = pair

    def refuse(pending: Pending) -> None:
        raise AuditUnavailable("trail disk gone")

    server = CommitServer(first.layout.root, refuse, first.archive.removal_generation)
    server.start()
    second.archive.link = CommitClient(first.layout.root)
    try:
        with pytest.raises(AuditUnavailable) as raised:
            second.archive.store(_raws(tmp_path)[-1], source_ae="MODALITY")
        assert store_failure(raised.value, LOG).status == OUT_OF_RESOURCES
    finally:
        second.archive.link.close()
        server.stop()
    assert _spares(second) == {}  # no doubt: nothing was committed, nothing kept
    assert list(first.archive.locate()) == []


@pytest.mark.parametrize("size", [32, 256], ids=["small-synced-first", "large-synced-after"])
def test_a_committer_gone_before_answering_keeps_the_staged_object(
        pair: tuple[Vault, Vault], tmp_path: Path, size: int) -> None:
    """A small object stored while others are under way is fsync'ed before its rows are
    handed over (one frame, "syncing" false); a large one's fsync runs meanwhile and a
    second frame says it is durable."""
    _first, second = pair
    path = second.layout.root / commit_link.SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with short_path(path) as where:
        listener.bind(where)
    listener.listen(1)
    taken: list[bytes] = []

    def take_then_die() -> None:
        """Reads the request and, when it says so, the "synced" frame (all worker 0 needs
        to commit), then vanishes (kill -9): the row may or may not have been committed."""
        conn, _ = listener.accept()
        with conn:
            while True:
                length = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
                taken.append(conn.recv(length, socket.MSG_WAITALL))
                if b'"syncing":true' not in taken[0] or len(taken) == 2:
                    return

    thread = threading.Thread(target=take_then_die)
    thread.start()
    second.archive.link = CommitClient(second.layout.root)
    raw = _raws(tmp_path)[-1] if size == 32 else _new_patient_image(tmp_path, size)
    archive = second.archive
    try:
        with pytest.raises(CommitOutcomeUnknown) as raised:
            with archive._cond:
                archive._in_flight += 1  # as if another store were on its way
            try:
                archive.store(raw, source_ae="MODALITY")
            finally:
                with archive._cond:
                    archive._in_flight -= 1
        # the modality is told to retry: "out of resources", not a failure of the object
        assert store_failure(raised.value, LOG).status == OUT_OF_RESOURCES
    finally:
        thread.join(10)
        listener.close()
        second.archive.link.close()
    if size == 32:
        assert len(taken) == 1 and b'"syncing":false' in taken[0]
    else:
        assert len(taken) == 2 and b'"synced":true' in taken[1]
    kept = _spares(second)
    assert len(kept) == 1  # kept: worker 0 may have committed the row naming it
    assert second.objects.read(next(iter(kept))) != raw  # (ciphertext, as always)


def test_a_removal_seen_by_the_committer_empties_the_senders_caches(
        pair: tuple[Vault, Vault], tmp_path: Path) -> None:
    """Worker 1 learnt a study (its rows and data key) from worker 0's answers; the study
    is then deleted on worker 0. Worker 1's next instance of that study, chosen from its
    stale cache, is refused by the committer (its removal generation is old) and the
    answer's generation empties worker 1's caches, so the store's retry chooses afresh:
    stored, never indexed under the deleted rows (without the generation in the answer,
    every retry would be refused the same way)."""
    first, second = pair
    server = CommitServer(first.layout.root, first.archive.commit_pending,
                          first.archive.removal_generation)
    server.start()
    second.archive.link = CommitClient(first.layout.root)
    raws = _raws(tmp_path)[:4]  # four slices of one study
    study = str(dcmread(tmp_path / "ct" / "ct0000.dcm").StudyInstanceUID)
    try:
        for raw in raws[:3]:
            assert second.archive.store(raw, source_ae="MODALITY").status \
                is StoreStatus.STORED
        assert study in second.archive._study_cache
        remover = Remover(first.engine, first.objects, first.recorder, first.archive)
        remover.delete("study", study, "sent to the wrong patient", actor="admin-test")
        assert second.archive.store(raws[3], source_ae="MODALITY").status \
            is StoreStatus.STORED
    finally:
        second.archive.settle()
        second.archive.link.close()
        server.stop()
    found = list(first.archive.locate(study_uid=study))
    assert [first.archive.read(i) for i in found] == [raws[3]]


def test_a_sender_that_never_says_synced_holds_no_commit(
        pair: tuple[Vault, Vault], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose object's fsync never returns (a dying disk) sent its rows but never
    its "synced" frame: past the timeout worker 0 fails that store alone (nothing of it
    committed), answers, and closes the connection (out of step); its own stores, queued
    with it, are committed meanwhile."""
    first, second = pair
    monkeypatch.setattr(commit_link, "_SYNC_TIMEOUT_S", 0.5)
    server = CommitServer(first.layout.root, first.archive.commit_pending,
                          first.archive.removal_generation)
    server.start()
    raws = _raws(tmp_path)
    parsed = parse.parse(raws[-1])
    chosen = second.archive._choose(parsed)
    assert not isinstance(chosen, StoreResult)
    key_id, generation, minted = chosen
    stuck = Pending(parsed, secrets.token_hex(16), key_id, "MODALITY", generation,
                    new_key=minted)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(first.layout.root / commit_link.SOCKET_NAME) as where:
            sock.connect(where)
        sock.settimeout(30)
        commit_link._send(sock, commit_link._request(stuck, syncing=True))
        mine = first.archive.store(raws[0], source_ae="MODALITY")  # not held by it
        assert mine.status is StoreStatus.STORED
        reply = commit_link._receive(sock)
        assert reply["ok"] is False and reply["type"] == "TimeoutError"
        assert sock.recv(1) == b""  # closed by worker 0
    finally:
        sock.close()
        server.stop()
    assert list(first.archive.locate(sop_uid=parsed.sop_uid)) == []
    assert len(list(first.archive.locate())) == 1
