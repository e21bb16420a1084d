"""Issue 17, C-MOVE: the sub-association the server opens to the destination waits for the
destination's answers as the request's own association of a C-GET does.

Before, that requestor association kept pynetdicom's DUL thread, which sleeps 1 ms between
looks at its socket, so every sub-operation waited for it before the next object could
leave, and each answer was decoded as a whole DIMSE message: the C-MOVE row of ``bench
compare`` ran at 0.66 of Orthanc's, ~2.4x slower than the C-GET of the same study.
``reactor.accelerate_requestors`` gives every association the server requests a
``WakeableDUL`` (woken by its socket) that reads an awaited C-STORE-RSP straight into its
status (``sendpath.answer``).

Checked in-process against a pynetdicom storage SCP that answers success, warning and
failure in turn: every answer was read by the sub-association's DUL thread (none on the
code before), the bytes that arrived are the stored ones, and the counts in the final
C-MOVE response equal the retrieval's record, with the fast paths on and off. A C-MOVE to
a destination nothing listens at still fails every sub-operation, says why, and leaves
the server serving.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE as ClientAE
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsvault.dicom import reactor, sendpath
from tests import corpus
from tests.helpers import storescu, wait_until

LOCAL = "127.0.0.1"
CALLING, DEST, REFUSING = "MOVEFAST", "MOVEDEST", "MOVENONE"
_ANSWERS = (0x0000, 0xB007, 0xA700)  # success, warning, failure (a full disk)


@dataclass
class Destination:
    """A pynetdicom storage SCP: what arrived (SOP Instance UID -> (syntax, bytes))."""

    port: int
    received: dict[str, tuple[str, bytes]]
    answers: list[int]  # the status to answer, in turn; empty: always success
    stop: Any


def _destination(contexts: dict[str, set[str]]) -> Destination:
    ae = ClientAE(ae_title=DEST)
    for sop_class, syntaxes in sorted(contexts.items()):
        # the stored syntaxes, and what a Big Endian object is converted to
        ae.add_supported_context(sop_class, sorted(
            syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    received: dict[str, tuple[str, bytes]] = {}
    answers: list[int] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        request = event.request
        with lock:
            received[str(request.AffectedSOPInstanceUID)] = (  # type: ignore[union-attr]
                str(event.context.transfer_syntax),
                bytes(request.DataSet.getvalue()))  # type: ignore[union-attr]
            return answers[(len(received) - 1) % len(answers)] if answers else 0x0000

    server = ae.start_server((LOCAL, 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    return Destination(server.server_address[1], received, answers, server.shutdown)


def _body(data: bytes) -> tuple[Dataset, bytes]:
    ds = dcmread(BytesIO(data), stop_before_pixels=True)
    start = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return ds, data[start:]


def _move(port: int, study_uids: list[str], destination: str) -> Dataset:
    """A C-MOVE of ``study_uids`` to ``destination``: the final response."""
    ae = ClientAE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(LOCAL, port, ae_title="PACSVAULT")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = sorted(study_uids)
    try:
        responses = [s for s, _ in assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove) if s]
    finally:
        assoc.release()
    return responses[-1]


@dataclass
class Env:
    port: int
    vault: Any
    stored: dict[str, tuple[str, str, bytes]]  # SOP Instance UID -> (study, syntax, body)
    dest: Destination
    answered: list[int]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    root = tmp_path_factory.mktemp("movefast")
    files = corpus.build(root / "corpus")
    contexts: dict[str, set[str]] = {}
    for f in files:
        head = dcmread(f.path, stop_before_pixels=True)
        contexts.setdefault(str(head.SOPClassUID), set()).add(
            str(head.file_meta.TransferSyntaxUID))
    dest = _destination(contexts)
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(CALLING, LOCAL, roles=("store", "query", "retrieve"))
    vault.nodes.add(DEST, LOCAL, port=dest.port, roles=("retrieve",))
    vault.nodes.add(REFUSING, LOCAL, port=_closed_port(), roles=("retrieve",))
    service = DicomService(vault)
    ports = service.start(LOCAL, 0, None)
    answered = [0]
    original = sendpath.answer

    def counted(body: Any, awaiting: tuple[int, int]) -> sendpath.StoreAnswer | None:
        found = original(body, awaiting)
        answered[0] += found is not None
        return found

    patch = pytest.MonkeyPatch()
    patch.setattr(sendpath, "answer", counted)
    try:
        for f in files:
            res = storescu(ports["dicom_port"], [f.path], calling=CALLING, extra=f.proposal)
            assert res.returncode == 0, res.stdout + res.stderr
        vault.archive.settle()
        stored = {}
        for f in files:
            ds, body = _body(vault.archive.read(next(vault.archive.locate(sop_uid=f.sop_uid))))
            stored[f.sop_uid] = (f.study_uid, str(ds.file_meta.TransferSyntaxUID), body)
        yield Env(ports["dicom_port"], vault, stored, dest, answered)
    finally:
        patch.undo()
        service.stop()
        vault.close()
        dest.stop()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def _moves(vault: Any) -> list[Any]:
    return [r for r in vault.audit.records() if r.action == "dicom.move"]


@pytest.mark.slow
def test_every_answer_is_read_by_the_sub_associations_dul_and_the_bytes_arrive(
        env: Env) -> None:
    as_stored = {uid: v for uid, v in env.stored.items() if v[1] != ExplicitVRBigEndian}
    env.dest.received.clear()
    env.dest.answers.clear()
    before = env.answered[0]
    final = _move(env.port, sorted({v[0] for v in env.stored.values()}), DEST)
    assert int(final.Status) == 0x0000
    assert set(env.dest.received) == set(env.stored)
    for uid, (_study, syntax, body) in as_stored.items():
        assert env.dest.received[uid] == (syntax, body)
    # each sub-operation's answer read straight into its status by the sub-association's
    # own DUL thread (0 when that DUL was pynetdicom's polling one)
    assert env.answered[0] - before == len(env.stored)


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
def test_answers_counted_alike_in_the_response_and_the_record(
        env: Env, enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination answers success, warning and failure in turn: the final C-MOVE
    response and the retrieval's record count them the same, whether the DUL thread read
    them or pynetdicom did."""
    monkeypatch.setattr(sendpath, "ENABLED", enabled)
    env.dest.received.clear()
    env.dest.answers[:] = _ANSWERS
    before = len(_moves(env.vault))
    final = _move(env.port, sorted({v[0] for v in env.stored.values()}), DEST)
    assert wait_until(lambda: len(_moves(env.vault)) > before, 30, 0.05)
    record = _moves(env.vault)[-1]
    counts = (int(final.NumberOfCompletedSuboperations),
              int(final.NumberOfWarningSuboperations),
              int(final.NumberOfFailedSuboperations))
    assert counts == (record.detail["sent"], record.detail["warning"],
                      record.detail["failed"])
    assert counts[1] and counts[2] and sum(counts) == len(env.stored)
    assert int(final.Status) == 0xB000  # some sub-operations failed or warned


@pytest.mark.slow
def test_a_destination_that_cannot_be_reached_is_unknown_and_the_server_goes_on(
        env: Env) -> None:
    """Nothing listens on the registered destination's port: the connection attempt of
    the (accelerated) sub-association fails, every sub-operation fails, the record says
    why, and the next C-MOVE is served."""
    before = len(_moves(env.vault))
    final = _move(env.port, sorted({v[0] for v in env.stored.values()}), REFUSING)
    assert int(final.Status) == 0xA702
    assert int(final.NumberOfFailedSuboperations) == len(env.stored)
    assert wait_until(lambda: len(_moves(env.vault)) > before, 30, 0.05)
    assert "could not be reached" in _moves(env.vault)[-1].message
    env.dest.answers.clear()
    assert int(_move(env.port, sorted({v[0] for v in env.stored.values()}),
                     DEST).Status) == 0x0000


def test_requestors_of_the_server_ae_are_accelerated_once() -> None:
    """``accelerate_requestors`` wraps an AE's socket factory once; an association it
    requests gets the waking DUL before its thread starts."""
    ae = ClientAE(ae_title="X")
    reactor.accelerate_requestors(ae)
    first = ae._create_socket
    reactor.accelerate_requestors(ae)
    assert ae._create_socket is first
    from pynetdicom.association import Association
    from pynetdicom.transport import AddressInformation

    assoc = Association(ae, "requestor")
    sock = ae._create_socket(assoc, AddressInformation.from_tuple(("", 0)), None)
    try:
        assert isinstance(assoc.dul, reactor.WakeableDUL)
        assert isinstance(sock, reactor.BulkSocket)
    finally:
        sock.close()


@pytest.mark.slow
def test_dicom_send_reads_every_answer_in_its_dul_and_the_bytes_arrive(env: Env) -> None:
    """``dicom send`` (the CLI, the web's "send to", forwarding) requests its association
    from an AE of its own: the same waking DUL, every answer read straight into its status
    (0 before), the objects as stored, the record's counts right."""
    from pacsvault.dicom import send

    env.dest.received.clear()
    env.dest.answers.clear()
    items = [i for study in sorted({v[0] for v in env.stored.values()})
             for i in send.select(env.vault, study)]
    before = env.answered[0]
    result = send.send(env.vault, DEST, items, origin="cli")
    assert result.ok and result.sent == len(env.stored)
    assert env.answered[0] - before == len(env.stored)
    for uid, (_study, syntax, body) in env.stored.items():
        if syntax != ExplicitVRBigEndian:
            assert env.dest.received[uid] == (syntax, body)
