"""Issue 17, C-GET/C-MOVE send path (``dicom/sendpath``): conformance of what leaves.

A retrieved object the peer accepted as stored leaves as one pre-encoded message: the
C-STORE-RQ command encoded directly and the P-DATA-TF PDUs laid out as headers and slices
of the stored bytes, written by the DUL thread in batches. Checked here:

- the encoding itself, in-process, against pynetdicom's: the command set byte for byte
  (and the C-GET/C-MOVE responses sent after each sub-operation, their PDU too),
  and the PDU stream byte for byte (fragment sizes, PDV headers, message control header
  bits of PS3.8 E.2) at max PDU 4096, 16384, 16385 and unlimited (0), and written in
  full when the socket takes a few bytes per ``sendmsg``; written by the association
  thread only when nothing is ahead of it for the DUL (else left to the DUL thread), a
  failed write becoming Evt17 in the DUL thread; the peer's C-STORE-RSP read by the DUL
  thread only when it is plainly the awaited answer;
- what real peers receive from the running server: pynetdicom C-GET at each of those
  PDU sizes, dcmtk ``getscu`` at odd PDU sizes, ``movescu`` into ``storescp +B +xa``
  with an odd PDU size, and C-GET over DICOM TLS: every object of the corpus (every
  stored syntax, plus an object larger than one write batch) comes back with its stored
  bytes, several objects per association (``gdcmscu --get`` produced no output and no
  file here, see the interop notes on gdcmscu: not a usable peer on this machine);
- a requester that aborts in the middle of the transfer: the server stays healthy (the
  next association is served), the retrieval's record says it was interrupted, the
  association is accounted;
- in-process, the same C-GET with the path on and off: same bytes received, and the path
  was taken for every object (so the tests above exercise it).
"""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE as ClientAE
from pynetdicom import build_role, evt
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from pacsvault.dicom import sendpath
from tests import corpus
from tests.harness.peers import StoreSCP
from tests.harness.served import Served, served_vault
from tests.helpers import AE, VaultDir, dcmtk, dcmtk_env, events, storescu, wait_until

LOCAL = "127.0.0.1"
CALLING, DEST = "SENDFAST", "SENDDEST"
PDU_SIZES = (4096, 16384, 16385, 0)


# --- the encoding, in-process -----------------------------------------------------------


def _pynetdicom_command(msg_id: int, sop_class: str, sop_uid: str, priority: int,
                        move_ae: str | None, move_id: int | None) -> bytes:
    req = C_STORE()
    req.MessageID, req.Priority = msg_id, priority
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_uid
    req.MoveOriginatorApplicationEntityTitle = move_ae
    req.MoveOriginatorMessageID = move_id
    req.DataSet = BytesIO(b"\0\0")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = encode(msg.command_set, True, True)
    assert out is not None
    return out


@pytest.mark.parametrize(("msg_id", "priority", "move_ae", "move_id"), [
    (1, 2, None, None), (65535, 0, None, None), (7, 1, "MOVER", 3), (8, 2, "EVENAE", 65535),
    (9, 2, "A B", 1), (10, 0, "SIXTEEN_CHARS_AE", 2)])
def test_command_set_is_pynetdicom_encoding(msg_id: int, priority: int, move_ae: str | None,
                                            move_id: int | None) -> None:
    for sop_class, sop_uid in ((CTImageStorage, "1.2.3.4"), (CTImageStorage, "1.2.3.45"),
                               ("1.2.840.10008.5.1.4.1.1.4", generate_uid())):
        ours = sendpath.encode_store_rq(msg_id, sop_class, sop_uid, priority, move_ae, move_id)
        assert ours == _pynetdicom_command(msg_id, sop_class, sop_uid, priority, move_ae,
                                           move_id)


@pytest.mark.parametrize("bad", [
    dict(sop_uid="1.2.03"), dict(sop_uid="1.2.3 "), dict(sop_uid="1." + "2" * 70),
    dict(move_ae=" LEADING"), dict(move_ae="BACK\\SLASH"), dict(move_ae="X" * 17),
    dict(move_id=70000), dict(priority=3)])
def test_command_values_left_to_pynetdicom(bad: dict[str, Any]) -> None:
    """What the direct encoder does not vouch for goes through pynetdicom (None)."""
    args: dict[str, Any] = dict(message_id=1, sop_class=CTImageStorage, sop_instance="1.2.3",
                                priority=2, move_ae=None, move_id=None)
    args.update({"sop_instance" if k == "sop_uid" else k: v for k, v in bad.items()})
    assert sendpath.encode_store_rq(**args) is None


def _pynetdicom_pdus(context_id: int, data: bytes, max_pdu: int) -> bytes:
    """What pynetdicom's DIMSE provider and DUL write for the message (one PDU each)."""
    req = C_STORE()
    req.MessageID, req.Priority = 3, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.4.5"
    req.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return b"".join(P_DATA_TF(pdata).encode() for pdata in msg.encode_msg(context_id, max_pdu))


@pytest.mark.parametrize("max_pdu", PDU_SIZES)
@pytest.mark.parametrize("size", [1, 4090, 4091, 12270, 16378, 16379, 32756, 32757, 100_001])
def test_pdus_are_pynetdicom_pdus(max_pdu: int, size: int) -> None:
    command = sendpath.encode_store_rq(3, CTImageStorage, "1.2.3.4.5", 2, None, None)
    assert command is not None
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    cut = sendpath.fragments(5, command, data, max_pdu)
    assert cut is not None
    pieces, total = cut
    wire = b"".join(pieces)
    assert len(wire) == total
    assert wire == _pynetdicom_pdus(5, data, max_pdu)
    # PS3.8 E.2 and 9.3.5, read back independently: one PDV per PDU, within the maximum
    pos, flags, payload = 0, [], bytearray()
    while pos < len(wire):
        assert wire[pos] == 0x04
        length = int.from_bytes(wire[pos + 2:pos + 6], "big")
        assert not max_pdu or length <= max_pdu
        assert int.from_bytes(wire[pos + 6:pos + 10], "big") == length - 4
        assert wire[pos + 10] == 5
        flags.append(wire[pos + 11])
        payload += wire[pos + 12:pos + 6 + length]
        pos += 6 + length
    assert bytes(payload) == command + data
    commands = [f for f in flags if f & 1]
    assert commands[-1] == 0x03 and all(f == 0x01 for f in commands[:-1])
    datas = flags[len(commands):]
    assert datas[-1] == 0x02 and all(f == 0x00 for f in datas[:-1])


def _pynetdicom_rsp(primitive: Any) -> bytes:
    msg = (C_GET_RSP if isinstance(primitive, C_GET) else C_MOVE_RSP)()
    msg.primitive_to_message(primitive)
    out = encode(msg.command_set, True, True)
    assert out is not None
    return out


@pytest.mark.parametrize("kind", [C_GET, C_MOVE])
@pytest.mark.parametrize(("status", "counts", "sop_class"), [
    (0xFF00, (59, 1, 0, 0), StudyRootQueryRetrieveInformationModelGet),
    (0xFF00, (0, 65535, 3, 2), "1.2.840.10008.5.1.4.1.2.2.3"),
    (0x0000, (None, 60, 0, 0), StudyRootQueryRetrieveInformationModelGet),
    (0xB000, (None, None, None, None), None)])
def test_retrieve_responses_are_pynetdicom_encoding(
        kind: type, status: int, counts: tuple[int | None, ...], sop_class: str | None) -> None:
    rsp = kind()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, status
    rsp.AffectedSOPClassUID = sop_class
    (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
     rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = counts
    rsp.Identifier = None
    assert sendpath.encode_retrieve_rsp(rsp) == _pynetdicom_rsp(rsp)


def test_retrieve_responses_left_to_pynetdicom() -> None:
    """An identifier (Failed SOP Instance UID List), a comment, a request: pynetdicom's."""
    with_identifier = C_GET()
    with_identifier.MessageIDBeingRespondedTo, with_identifier.Status = 1, 0xA702
    with_identifier.Identifier = BytesIO(b"\x08\x00\x58\x11\x02\x00\x00\x001\x00")
    with_comment = C_GET()
    with_comment.MessageIDBeingRespondedTo, with_comment.Status = 1, 0xC000
    with_comment.ErrorComment = "no"  # type: ignore[assignment]
    request = C_GET()
    request.MessageID = 1
    for primitive in (with_identifier, with_comment, request):
        assert sendpath.encode_retrieve_rsp(primitive) is None


class _Dimse:
    """What ``sendpath.send_msg`` reads of pynetdicom's DIMSE provider; its DUL records
    the primitives queued for the wire."""

    def __init__(self, max_pdu: int) -> None:
        self.maximum_pdu_size = max_pdu
        self.queued: list[Any] = []
        self.dul = DULServiceProvider.__new__(DULServiceProvider)
        self.dul.send_pdu = self.queued.append  # type: ignore[assignment, method-assign]
        self.assoc = self

    @staticmethod
    def get_handlers(_event: Any) -> list[Any]:
        return []


@pytest.mark.parametrize("max_pdu", PDU_SIZES)
@pytest.mark.parametrize("kind", [C_GET, C_MOVE])
def test_retrieve_response_pdu_is_pynetdicom_pdu(max_pdu: int, kind: type) -> None:
    """The Pending response after each sub-operation, queued as a ``Wire``: the P-DATA-TF
    PDU pynetdicom's ``send_msg`` (``encode_msg``) and DUL (``P_DATA_TF.encode``) write."""
    rsp = kind()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0xFF00
    rsp.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelGet
    (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
     rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = (599, 1, 0, 0)
    rsp.Identifier = None
    dimse = _Dimse(max_pdu)
    assert sendpath.send_msg(dimse, rsp, 3)
    [wire] = dimse.queued
    assert isinstance(wire, sendpath.Wire)
    written = b"".join(wire.pv_pieces)
    assert len(written) == wire.pv_size
    msg = (C_GET_RSP if kind is C_GET else C_MOVE_RSP)()
    msg.primitive_to_message(rsp)
    assert written == b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(3, max_pdu))


class _Trickle:
    """A socket whose ``sendmsg`` takes at most ``step`` bytes a call (as a full kernel
    buffer does), recording the bytes and the number of buffers per call."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.out = bytearray()
        self.buffers: list[int] = []

    def sendmsg(self, buffers: list[Any]) -> int:
        self.buffers.append(len(buffers))
        joined = b"".join(buffers)[:self.step]
        self.out += joined
        return len(joined)


@pytest.mark.parametrize("step", [1, 5, 11, 12, 4096, 1 << 30])
def test_gathered_writes_resume_where_the_kernel_stopped(step: int) -> None:
    command = sendpath.encode_store_rq(3, CTImageStorage, "1.2.3.4.5", 2, None, None)
    assert command is not None
    data = np.random.default_rng(step).integers(0, 256, 40_001, dtype=np.uint8).tobytes()
    cut = sendpath.fragments(5, command, memoryview(data)[1:], 4096 if step < 100 else 64)
    assert cut is not None
    pieces, total = cut
    sock = _Trickle(step)
    sendpath._send_gathered(sock, pieces)
    assert bytes(sock.out) == b"".join(pieces) and len(sock.out) == total
    assert max(sock.buffers) <= sendpath._IOV


def _dul(sock: Any, state: str = "Sta6") -> Any:
    """What ``sendpath.write_now`` reads of a ``reactor`` DUL."""
    dul = SimpleNamespace(_pv_write_lock=threading.Lock(), socket=SimpleNamespace(socket=sock),
                          state_machine=SimpleNamespace(current_state=state),
                          to_provider_queue=queue.Queue(), event_queue=queue.Queue(),
                          queued=[])
    dul.send_pdu = dul.queued.append
    return dul


def _wire() -> sendpath.Wire:
    command = sendpath.encode_store_rq(3, CTImageStorage, "1.2.3.4.5", 2, None, None)
    cut = sendpath.fragments(5, command or b"", b"\1" * 50_000, 16384)
    assert cut is not None
    return sendpath.Wire(*cut)


def test_written_at_once_by_the_association_thread_when_nothing_is_ahead() -> None:
    here, peer = socket.socketpair()
    with here, peer:
        wire = _wire()
        expected = b"".join(wire.pv_pieces)
        dul = _dul(here)
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read(peer, len(expected))))
        reader.start()
        assert sendpath.write_now(dul, wire)
        reader.join(10)
        assert bytes(got) == expected and not dul.queued and wire.pv_pieces == []


def _read(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_left_to_the_dul_thread_otherwise() -> None:
    """Something queued or an event pending before it, another state, TLS, a DUL that is
    not ``reactor``'s: nothing written, the caller queues it (order kept)."""
    here, peer = socket.socketpair()
    with here, peer:
        ahead = _dul(here)
        ahead.to_provider_queue.put(object())
        event = _dul(here)
        event.event_queue.put("Evt10")
        released = _dul(here, "Sta7")
        tls = _dul(ssl.create_default_context().wrap_socket(
            socket.socket(), server_hostname=LOCAL, do_handshake_on_connect=False))
        for dul in (ahead, event, released, tls):
            assert not sendpath.write_now(dul, _wire())
        assert not sendpath.write_now(SimpleNamespace(), _wire())
        tls.socket.socket.close()
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(1)


def test_a_failed_write_is_evt17_in_the_dul_thread() -> None:
    here, peer = socket.socketpair()
    peer.close()
    with here:
        dul = _dul(here)
        assert sendpath.write_now(dul, _wire())
        [failed] = dul.queued
        assert isinstance(failed, sendpath.Wire) and failed.pv_failed
    provider = DULServiceProvider.__new__(DULServiceProvider)
    assert sendpath.wire_dul(provider)
    provider.event_queue = queue.Queue()
    provider._pv_write(failed)  # type: ignore[attr-defined]
    assert provider.event_queue.get_nowait() == "Evt17"


def _store_rsp_pdus(status: int, max_pdu: int = 0, msg_id: int = 9, context_id: int = 5,
                    **extra: Any) -> list[bytes]:
    """A C-STORE-RSP's P-DATA-TF PDUs as pynetdicom (and dcmtk: same elements, same
    order) write them."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = msg_id, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.4.5"
    for keyword, value in extra.items():
        setattr(rsp, keyword, value)
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    return [P_DATA_TF(p).encode() for p in msg.encode_msg(context_id, max_pdu)]


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB007, 0xA700, 0xC000, 0xFFFF])
def test_the_awaited_answer_is_read_with_its_status(status: int) -> None:
    [pdu] = _store_rsp_pdus(status)
    found = sendpath.answer(memoryview(pdu)[6:], (9, 5))
    assert found is not None and found.status == status


def test_answers_left_to_pynetdicom() -> None:
    """Anything but the plain answer awaited: pynetdicom decodes it, as before."""
    [plain] = _store_rsp_pdus(0)
    assert sendpath.answer(plain[6:], (8, 5)) is None  # another request's answer
    assert sendpath.answer(plain[6:], (9, 7)) is None  # another context
    [comment] = _store_rsp_pdus(0xC000, ErrorComment="no")
    assert sendpath.answer(comment[6:], (9, 5)) is None
    [offending] = _store_rsp_pdus(0xA900, OffendingElement=[0x00100010])
    assert sendpath.answer(offending[6:], (9, 5)) is None
    fragmented = _store_rsp_pdus(0, max_pdu=64)
    assert len(fragmented) > 1
    assert all(sendpath.answer(p[6:], (9, 5)) is None for p in fragmented)
    command = sendpath.encode_store_rq(9, CTImageStorage, "1.2.3.4.5", 2, None, None)
    cut = sendpath.fragments(5, command or b"", b"", 0)
    assert command is not None and cut is not None
    request = b"".join(cut[0])
    assert sendpath.answer(request[6:], (9, 5)) is None
    for broken in (plain[6:-1], plain[6:] + b"\0\0", plain[6:10] + b"\x05\x01" + plain[12:],
                   plain[6:12] + b"\x00\x00\x05\x00" + plain[16:]):  # short, long,
        assert sendpath.answer(broken, (9, 5)) is None  # not last command, group length
    assert sendpath.answer(b"", (9, 5)) is None


def test_pdu_sizes_pynetdicom_refuses_are_left_to_it() -> None:
    assert sendpath.fragments(1, b"\0" * 10, b"\0" * 10, 7) is None


# --- against real peers, one served vault -------------------------------------------------


@dataclass(frozen=True)
class Stored:
    sop_uid: str
    study_uid: str
    sop_class: str
    syntax: str
    body: bytes  # the dataset bytes after the File Meta Information, as archived


@dataclass
class Env:
    served: Served
    root: Path
    stored: list[Stored]
    dest: StoreSCP

    @property
    def vault(self) -> VaultDir:
        return self.served.vault


def _large_ct(path: Path) -> None:
    """A synthetic CT (no real patient) larger than one write batch."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "SEND^PATH", "SP-1", "CT"
    ds.Rows = ds.Columns = 800
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(800).integers(0, 4096, (800, 800),
                                                       dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _body(data: bytes) -> tuple[Dataset, bytes]:
    ds = dcmread(BytesIO(data), stop_before_pixels=True)
    start = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return ds, data[start:]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("sendfast")
    dest = StoreSCP.start(DEST, root, "+B", "+xa", "-pdu", "16385")
    try:
        with served_vault(root / "vault", nodes=[
                (CALLING, ("--roles", "store,query,retrieve"), LOCAL),
                (DEST, ("--port", str(dest.port), "--roles", "retrieve"), LOCAL)]) as served:
            files = corpus.build(root / "corpus")
            for f in files:
                res = storescu(served.server.port, [f.path], calling=CALLING, extra=f.proposal)
                assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"
            big = root / "large.dcm"
            _large_ct(big)
            res = storescu(served.server.port, [big], calling=CALLING)
            assert res.returncode == 0, res.stdout + res.stderr
            uids = [f.sop_uid for f in files] + [str(dcmread(big).SOPInstanceUID)]
            v = served.vault.open()
            try:
                stored = []
                for uid in uids:
                    (item,) = list(v.archive.locate(sop_uid=uid))
                    ds, body = _body(v.archive.read(item))
                    stored.append(Stored(uid, str(ds.StudyInstanceUID), str(ds.SOPClassUID),
                                         str(ds.file_meta.TransferSyntaxUID), body))
            finally:
                v.close()
            assert max(len(s.body) for s in stored) > sendpath.BATCH
            yield Env(served, root, stored, dest)
    finally:
        dest.stop()


def _identifier(stored: list[Stored]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = sorted({s.study_uid for s in stored})
    return ds


def _as_stored(stored: list[Stored]) -> list[Stored]:
    """The objects a requester can receive as stored (Big Endian is always converted)."""
    return [s for s in stored if s.syntax != ExplicitVRBigEndian]


def _getter(stored: list[Stored], max_pdu: int) -> tuple[ClientAE, list[Any]]:
    ae = ClientAE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Verification)
    roles = []
    for sop_class in sorted({s.sop_class for s in stored}):
        for syntax in sorted({s.syntax for s in _as_stored(stored) if s.sop_class == sop_class}):
            ae.add_requested_context(sop_class, [syntax])
        roles.append(build_role(sop_class, scp_role=True))
    return ae, roles


def _c_get(stored: list[Stored], port: int, max_pdu: int,
           tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, tuple[str, bytes]]]:
    """(final status, SOP Instance UID -> (context syntax, dataset bytes received))."""
    ae, roles = _getter(stored, max_pdu)
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        request = event.request
        received[str(request.AffectedSOPInstanceUID)] = (  # type: ignore[union-attr]
            str(event.context.transfer_syntax),
            bytes(request.DataSet.getvalue()))  # type: ignore[union-attr]
        return 0x0000

    assoc = ae.associate(LOCAL, port, ae_title=AE,
                         ext_neg=list[Any](roles), evt_handlers=[(evt.EVT_C_STORE, on_store)],
                         tls_args=(tls, LOCAL) if tls else None)
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_get(
            _identifier(stored), StudyRootQueryRetrieveInformationModelGet) if s]
    finally:
        assoc.release()
    return int(responses[-1].Status), received


_ANSWERS = (0x0000, 0xB007, 0xA700)  # success, warning, failure (a full disk)


def _c_get_counts(stored: list[Stored], port: int) -> tuple[int, int, int, int]:
    """A C-GET whose requester answers its C-STORE sub-operations in turn with success,
    a warning and a failure: (final status, completed, warning, failed) of the final
    response."""
    ae, roles = _getter(stored, 16384)
    seen = [0]

    def on_store(_event: evt.Event) -> int:
        seen[0] += 1
        return _ANSWERS[(seen[0] - 1) % len(_ANSWERS)]

    assoc = ae.associate(LOCAL, port, ae_title=AE, ext_neg=list[Any](roles),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        final = [s for s, _ in assoc.send_c_get(
            _identifier(stored), StudyRootQueryRetrieveInformationModelGet) if s][-1]
    finally:
        assoc.release()
    return (int(final.Status), int(final.NumberOfCompletedSuboperations),
            int(final.NumberOfWarningSuboperations), int(final.NumberOfFailedSuboperations))


def _assert_identical(stored: list[Stored], received: dict[str, tuple[str, bytes]]) -> None:
    for s in _as_stored(stored):
        syntax, body = received[s.sop_uid]
        assert syntax == s.syntax
        assert body == s.body, s.syntax


@pytest.mark.slow
@pytest.mark.parametrize("max_pdu", PDU_SIZES)
def test_pynetdicom_get_receives_the_stored_bytes(env: Env, max_pdu: int) -> None:
    status, received = _c_get(env.stored, env.served.server.port, max_pdu)
    assert status == 0x0000, f"{status:04X}"
    assert set(received) == {s.sop_uid for s in env.stored}
    _assert_identical(env.stored, received)


@pytest.mark.slow
@pytest.mark.parametrize("pdu", ["4096", "16385"])
def test_getscu_receives_the_stored_bytes(env: Env, pdu: str) -> None:
    """dcmtk ``getscu`` (its default uncompressed proposal) at an odd and the smallest
    PDU size: the uncompressed objects come back as stored, the rest converted."""
    out = env.root / f"getscu-{pdu}"
    out.mkdir()
    res = subprocess.run(
        [dcmtk("getscu"), "-S", "+B", "-pdu", pdu, "-aet", CALLING, "-aec", AE,
         "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
         "-k", "StudyInstanceUID=" + "\\".join(sorted({s.study_uid for s in env.stored})),
         LOCAL, str(env.served.server.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
           for p in out.iterdir() if p.is_file()}
    assert set(got) == {s.sop_uid for s in env.stored}
    same = 0
    for s in env.stored:
        ds, body = _body(got[s.sop_uid].read_bytes())
        if str(ds.file_meta.TransferSyntaxUID) == s.syntax:
            assert body == s.body, s.syntax
            same += 1
    assert same >= 3  # explicit and implicit little endian, the large CT


@pytest.mark.slow
def test_move_into_storescp_receives_the_stored_bytes(env: Env) -> None:
    """``movescu`` sends every study to ``storescp +B +xa -pdu 16385`` (the C-MOVE
    sub-association is pynetdicom's own requestor association)."""
    res = subprocess.run(
        [dcmtk("movescu"), "-S", "-aet", CALLING, "-aec", AE, "-aem", DEST,
         "-k", "QueryRetrieveLevel=STUDY",
         "-k", "StudyInstanceUID=" + "\\".join(sorted({s.study_uid for s in env.stored})),
         LOCAL, str(env.served.server.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    got = env.dest.files()
    assert set(got) == {s.sop_uid for s in env.stored}
    for s in _as_stored(env.stored):
        ds, body = _body(got[s.sop_uid].read_bytes())
        assert str(ds.file_meta.TransferSyntaxUID) == s.syntax
        assert body == s.body, s.syntax


@pytest.mark.slow
def test_get_over_tls_receives_the_stored_bytes(env: Env) -> None:
    ctx = ssl.create_default_context(cafile=str(env.served.ca))
    ctx.check_hostname = False
    status, received = _c_get(env.stored, env.served.server.tls_port, 16385, tls=ctx)
    assert status == 0x0000, f"{status:04X}"
    _assert_identical(env.stored, received)


def _aborted_get(stored: list[Stored], port: int) -> None:
    """A C-GET at 4096-byte PDUs whose requester aborts when the first object arrives."""
    ae, roles = _getter(stored, 4096)
    # pynetdicom's requester waits ``dimse_timeout`` for a response its own abort means
    # never comes: a short wait ends the C-GET loop soon after the abort.
    ae.dimse_timeout = 3
    seen: list[str] = []

    def on_store(event: evt.Event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        if len(seen) == 1:
            threading.Thread(target=event.assoc.abort, daemon=True).start()
        return 0x0000

    assoc = ae.associate(LOCAL, port, ae_title=AE, ext_neg=list[Any](roles),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    for _ in assoc.send_c_get(_identifier(stored), StudyRootQueryRetrieveInformationModelGet):
        pass
    assert wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), 30, 0.05)
    assert len(seen) < len(stored)


@pytest.mark.slow
# the requester's own pynetdicom DUL raises in its thread when its handler's response
# meets the association it aborted (Evt9 in Sta13): the client's, not the server's
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requester_aborting_mid_transfer_leaves_the_server_healthy(env: Env) -> None:
    """The requester aborts while the second object arrives (4096-byte PDUs: the large
    CT is ~300 PDUs): the server records the interrupted retrieval, accounts the
    association, and serves the next one."""
    before = len(events(env.vault, "dicom.get"))
    _aborted_get(env.stored, env.served.server.port)
    assert wait_until(lambda: len(events(env.vault, "dicom.get")) > before, 30)
    assert wait_until(lambda: any("interrupted" in str(r["message"])
                                  for r in events(env.vault, "dicom.get")[before:]), 30)
    # the next association is served in full
    status, received = _c_get(env.stored, env.served.server.port, 16384)
    assert status == 0x0000 and set(received) == {s.sop_uid for s in env.stored}
    assert env.served.server.proc.poll() is None


# --- both paths in-process -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_both_send_paths_deliver_the_same_bytes(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    written = [0]
    original = sendpath.WireDUL._pv_write

    def counted(self: Any, wire: sendpath.Wire) -> None:
        if len(wire.pv_pieces) > 1:  # a C-STORE-RQ (a response is one piece)
            written[0] += 1
        original(self, wire)

    original_now = sendpath.write_now

    def counted_now(dul: Any, wire: sendpath.Wire) -> bool:
        request = len(wire.pv_pieces) > 1
        done = original_now(dul, wire)
        written[0] += done and request
        return done

    monkeypatch.setattr(sendpath.WireDUL, "_pv_write", counted)
    monkeypatch.setattr(sendpath, "write_now", counted_now)
    answered = [0]
    original_answer = sendpath.answer

    def answer(body: Any, awaiting: tuple[int, int]) -> sendpath.StoreAnswer | None:
        found = original_answer(body, awaiting)
        answered[0] += found is not None
        return found

    monkeypatch.setattr(sendpath, "answer", answer)
    create(tmp_path / "data", key_file=tmp_path / "key")
    vault = Vault.open(tmp_path / "data", tmp_path / "key")
    vault.nodes.add(CALLING, LOCAL, roles=("store", "query", "retrieve"))
    service = DicomService(vault)
    ports = service.start(LOCAL, 0, None)
    try:
        files = corpus.build(tmp_path / "corpus")
        for f in files:
            res = storescu(ports["dicom_port"], [f.path], calling=CALLING, extra=f.proposal)
            assert res.returncode == 0, res.stdout + res.stderr
        vault.archive.settle()
        stored = []
        for f in files:
            ds, body = _body(vault.archive.read(next(vault.archive.locate(sop_uid=f.sop_uid))))
            stored.append(Stored(f.sop_uid, f.study_uid, str(ds.SOPClassUID),
                                 str(ds.file_meta.TransferSyntaxUID), body))
        results = {}
        for enabled in (True, False):
            monkeypatch.setattr(sendpath, "ENABLED", enabled)
            before, answered_before = written[0], answered[0]
            status, received = _c_get(stored, ports["dicom_port"], 16385)
            assert status == 0x0000
            results[enabled] = (received, written[0] - before, answered[0] - answered_before)
        assert results[True][0] == results[False][0]
        assert results[True][1:] == (len(_as_stored(stored)),) * 2
        assert results[False][1:] == (0, 0)
        _assert_identical(stored, results[True][0])
        # The requester's answers (success, warning, failure in turn) counted alike in the
        # final response and the retrieval's record, whether the DUL thread read them
        # (``sendpath.answer``) or pynetdicom did.
        def gets() -> list[Any]:
            return [r for r in vault.audit.records() if r.action == "dicom.get"]

        tallies: dict[bool, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
        for enabled in (True, False):
            monkeypatch.setattr(sendpath, "ENABLED", enabled)
            before = len(gets())
            final = _c_get_counts(stored, ports["dicom_port"])
            assert wait_until(lambda: len(gets()) > before, 30, 0.05)  # noqa: B023
            record = gets()[-1]
            tallies[enabled] = (final, {k: record.detail[k]
                                        for k in ("sent", "warning", "failed", "requested")})
        assert tallies[True] == tallies[False]
        (_status, completed, warning, failed), detail = tallies[True]
        assert (completed, warning, failed) == (detail["sent"], detail["warning"],
                                                detail["failed"])
        assert warning and failed and completed + warning + failed == len(stored)
        # an abort in the middle: the association's budget is given back, the retrieval
        # recorded as interrupted
        monkeypatch.setattr(sendpath, "ENABLED", True)
        _aborted_get(stored, ports["dicom_port"])
        assert wait_until(lambda: service.budget.counts == (0, 0), 30, 0.05)
        assert wait_until(lambda: any(r.action == "dicom.get" and "interrupted" in r.message
                                      for r in vault.audit.records()), 30)
    finally:
        service.stop()
        vault.close()


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC211, 0xFFFF])
def test_store_status_is_the_dataset_pynetdicom_returns(status: int) -> None:
    """What ``send_c_store`` returns for an answer read by the DUL thread: equal to the
    dataset pynetdicom's ``_check_received_status`` builds, read as element or keyword;
    once (0000,0900) is changed or removed, ``Status`` follows the dataset."""
    expected = Dataset()
    expected.Status = status
    found = sendpath.StoreStatus.of(status)
    assert found.Status == status and isinstance(found.Status, int)
    assert found == expected and expected == found
    assert found[0x00000900].value == status and found.Status == status
    again = sendpath.StoreStatus.of(status)
    setattr(again, "Status", 0x0107)  # pydicom's keyword assignment  # noqa: B010
    assert again.Status == 0x0107 and again[0x00000900].value == 0x0107
    del again.Status
    assert "Status" not in again and not hasattr(again, "Status")
    assert sendpath.StoreStatus.of(status).Status == status  # nothing shared


@pytest.mark.parametrize("kind", [C_GET, C_MOVE])
def test_retrieve_responses_of_one_retrieval_are_pynetdicom_encoding(kind: type) -> None:
    """The *Pending* responses of a retrieval share their first elements (encoded once):
    each, and a final status and another request's after them, as pynetdicom encodes."""
    for msg_id, status, sop_class in ((7, 0xFF00, StudyRootQueryRetrieveInformationModelGet),
                                      (7, 0xFF00, StudyRootQueryRetrieveInformationModelGet),
                                      (7, 0x0000, StudyRootQueryRetrieveInformationModelGet),
                                      (8, 0xFF00, StudyRootQueryRetrieveInformationModelGet),
                                      (8, 0xFF00, None)):
        for done in (0, 1, 299, 65535):
            rsp = kind()
            rsp.MessageIDBeingRespondedTo, rsp.Status = msg_id, status
            rsp.AffectedSOPClassUID = sop_class
            (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
             rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = (
                65535 - done, done, 0, 1)
            rsp.Identifier = None
            assert sendpath.encode_retrieve_rsp(rsp) == _pynetdicom_rsp(rsp)
    bad = kind()
    bad.MessageIDBeingRespondedTo, bad.Status = 7, 0xFF00
    bad.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    bad.__dict__["_affected_sop_class_uid"] = "1.02.3"  # not a UID: left to pynetdicom
    for _ in range(2):
        assert sendpath.encode_retrieve_rsp(bad) is None
