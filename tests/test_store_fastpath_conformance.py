"""Issue 17: the direct C-STORE receive path (``dicom/storewire``) is conformant.

What is stored must be byte for byte what pynetdicom's path stores (its Part 10 header,
then the dataset bytes as received), whatever the sender and its PDU sizes: dcmtk
``storescu`` (default, 4096, odd 16385, 131072, compressed syntaxes, several files per
association, DICOM TLS with a client certificate) and hand-made P-DATA-TF PDUs over an
association pynetdicom negotiated (a dataset in many PDVs, command and dataset in one PDU,
several presentation contexts, another message in the PDU that ends a dataset). Protocol
errors abort the association and store nothing; an abort mid-dataset stores nothing; each
such association gives its slot back (two slots in all here). The asynchronous operations
window is negotiated down to one.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE as ClientAE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsvault.dicom.part10 import file_meta
from pacsvault.dicom.server import _taken
from pacsvault.dicom.storewire import FastStore, StoreReceiver, encode_store_rsp, parse_command
from tests.harness.served import Served, served_vault
from tests.helpers import VaultDir, storescu, wait_until

CALLING, CERTMOD = "FASTMOD", "FASTCERT"
PIXEL_DATA, PADDING = 0x7FE00010, 0xFFFCFFFC  # storescu drops trailing padding
SETTINGS = {"max_associations": "2", "network_timeout": "20.0"}


@dataclass
class Env:
    served: Served
    root: Path

    @property
    def vault(self) -> VaultDir:
        return self.served.vault


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("storefast")

    def certify(vault: VaultDir) -> None:
        vault.cli("node", "cert", CERTMOD, "--out", root / "certs")

    with served_vault(root / "vault", nodes=[(CALLING, (), "127.0.0.1"),
                                             (CERTMOD, ("--client-cert",), "127.0.0.1")],
                      settings={"dicom": SETTINGS}, prepare=certify) as served:
        yield Env(served, root)


# --- helpers ----------------------------------------------------------------------------


def _ct(path: Path | None = None, rows: int = 256, syntax: UID = ExplicitVRLittleEndian,
        sop_class: UID = CTImageStorage) -> tuple[Dataset, bytes]:
    """A synthetic image (no real patient); its dataset bytes in ``syntax``; saved to
    ``path`` as Part 10 when given."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "FAST^PATH", "FP-1", "CT"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20240101", 1, 1
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(rows)
    ds.PixelData = rng.integers(0, 4096, (rows, rows), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID, ds.SOPInstanceUID)
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return ds, buf.getvalue()


def _dataset_part(path: Path) -> bytes:
    raw = path.read_bytes()
    length = int(dcmread(path, stop_before_pixels=True).file_meta
                 .FileMetaInformationGroupLength)
    return raw[128 + 4 + 12 + length:]


def _expected(sop_class: str, sop_uid: str, syntax: str, dataset: bytes) -> bytes:
    """What pynetdicom's path stores: its file meta, then the dataset as received."""
    meta = encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class),
                                             sop_instance_uid=UID(sop_uid),
                                             transfer_syntax=UID(syntax)))
    return b"\x00" * 128 + b"DICM" + meta + dataset


def _stored(env: Env, sop_uid: str) -> list[bytes]:
    vault = env.vault.open()
    try:
        return [vault.archive.read(item) for item in vault.archive.locate(sop_uid=sop_uid)]
    finally:
        vault.close()


def _indexed_digest(env: Env, sop_uid: str) -> bytes:
    """The SHA-256 the index holds for the instance (what a re-send is compared with)."""
    from sqlalchemy import select

    from pacsvault.index.models import Instance

    vault = env.vault.open()
    try:
        with vault.archive._sessions() as session:
            return bytes(session.execute(select(Instance.sha256)
                                         .where(Instance.sop_uid == sop_uid)).scalar_one())
    finally:
        vault.close()


def _store_cmd(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_uid
    req.DataSet = BytesIO(b"x")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return bytes(encode(msg.command_set, True, True))  # type: ignore[arg-type]


def _echo_cmd(message_id: int) -> bytes:
    req = C_ECHO()
    req.MessageID, req.AffectedSOPClassUID = message_id, Verification
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    return bytes(encode(msg.command_set, True, True))  # type: ignore[arg-type]


def _pdv(cid: int, header: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cid, header) + data


def _pdata(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


class RawSCU:
    """An association pynetdicom negotiates; P-DATA-TF PDUs written by hand on its socket
    while its reactor is paused, responses read from its DIMSE queue."""

    def __init__(self, port: int, contexts: list[tuple[str, list[str]]],
                 ext_neg: list[Any] | None = None) -> None:
        ae = ClientAE(ae_title=CALLING)
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
        deadline = time.monotonic() + 15
        while True:  # both slots may still be held by the previous test's associations
            self.assoc = ae.associate("127.0.0.1", port, ae_title="PACSVAULT",
                                      ext_neg=ext_neg)
            if self.assoc.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert self.assoc.is_established

    def cid(self, abstract: str, syntax: str) -> int:
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax == abstract and cx.transfer_syntax[0] == syntax:
                return int(cx.context_id)  # type: ignore[arg-type]
        raise AssertionError("context not accepted")

    def pause(self) -> None:
        self.assoc._reactor_checkpoint.clear()
        assert wait_until(lambda: self.assoc._is_paused, 5, 0.001)

    def send(self, raw: bytes) -> None:
        self.assoc.dul.socket.socket.sendall(raw)  # type: ignore[union-attr]

    def response(self) -> Any:
        _, rsp = self.assoc.dimse.get_msg(block=True)
        return rsp

    def close(self) -> None:
        self.assoc._reactor_checkpoint.set()
        if self.assoc.is_established:
            self.assoc.release()


# --- the pieces -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xB006, 0xC000, 0xC211, 0x0124])
def test_store_rsp_is_encoded_as_pynetdicom_encodes_it(status: int) -> None:
    for sop_class, sop_uid in ((CTImageStorage, "1.2.3.4"), (MRImageStorage, "1.2.3.45")):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 7, status
        rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = sop_class, sop_uid
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        expected = encode(msg.command_set, True, True)
        assert encode_store_rsp(7, sop_class, sop_uid, status) == expected


def test_only_plain_store_commands_are_taken() -> None:
    good = _store_cmd(CTImageStorage, "1.2.3.4", 9)
    command = parse_command(good)
    assert command is not None
    assert (command.message_id, command.sop_class, command.sop_instance) == (
        9, CTImageStorage, "1.2.3.4")
    assert parse_command(_echo_cmd(3)) is None  # another service: pynetdicom's path
    assert parse_command(good[:-3]) is None  # truncated
    assert parse_command(_store_cmd(CTImageStorage, "1.02.3")) is None  # not a PS3.5 UID
    bad_length = bytearray(good)
    bad_length[8:12] = struct.pack("<I", len(good))  # group length that does not match
    assert parse_command(bytes(bad_length)) is None


def test_received_pieces_join_into_the_stream_and_let_the_pdus_go() -> None:
    """The dataset's fragments are kept as views of their PDUs (``storewire._Message``):
    joined, they are the file meta then the fragments as sent; once taken, no view is
    left on any PDU (each PDU read is a fresh buffer, freed with its last view)."""
    command = _store_cmd(CTImageStorage, "1.2.3.4", 5)
    dataset = bytes(range(256)) * 40
    pdus = [bytearray(struct.pack(">LBB", 2 + len(command), 1, 0x03) + command)]
    pieces = [dataset[:1000], dataset[1000:1000], dataset[1000:7000], dataset[7000:]]
    body = bytearray()
    for k, piece in enumerate(pieces):  # the last two in one PDU, as two PDVs
        body += struct.pack(">LBB", 2 + len(piece), 1, 0x02 if k == 3 else 0x00) + piece
        if k != 2:
            pdus.append(body)
            body = bytearray()
    delivered: list[FastStore] = []
    receiver = StoreReceiver()
    for pdu in pdus:
        with memoryview(pdu) as view:
            receiver.feed(view, lambda: False, lambda _c, _cmd: ExplicitVRLittleEndian,
                          lambda _c, _p: True, delivered.append)
    assert len(delivered) == 1 and not receiver.busy
    stream = delivered[0].part10
    assert _taken(stream) == file_meta(CTImageStorage, "1.2.3.4",
                                       ExplicitVRLittleEndian) + dataset
    for pdu in pdus:
        pdu.extend(b"x")  # resizable again: no view of it is left


# --- dcmtk storescu ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("pdu", [None, "4096", "16385", "131072"])
def test_dcmtk_storescu_pdu_sizes_store_byte_identical(env: Env, pdu: str | None) -> None:
    paths = [env.root / f"ct-{pdu}-{k}.dcm" for k in range(3)]
    datasets = [_ct(path, rows=256 + 16 * k)[0] for k, path in enumerate(paths)]
    extra = ("-pdu", pdu) if pdu else ()
    res = storescu(env.served.server.port, paths, calling=CALLING, extra=extra)
    assert res.returncode == 0, res.stdout + res.stderr
    for ds, path in zip(datasets, paths, strict=True):
        want = _expected(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                         _dataset_part(path))
        assert _stored(env, ds.SOPInstanceUID) == [want]
        # the index's digest is the stored bytes' own (a re-send is compared with it)
        assert _indexed_digest(env, ds.SOPInstanceUID) == hashlib.sha256(want).digest()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "flag"), [
    ("JPGExtended.dcm", "-xx"), ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
    ("SC_rgb_rle.dcm", "-xr")])
def test_dcmtk_storescu_compressed_syntaxes_store_as_received(
        env: Env, name: str, flag: str) -> None:
    source = dcmread(get_testdata_file(name))  # type: ignore[arg-type]
    source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for tag in [e.tag for e in source if e.tag.element == 0]:
        del source[tag]  # group lengths: storescu leaves them out (its defaults)
    path = env.root / f"c-{name}"
    source.save_as(path, enforce_file_format=True)
    res = storescu(env.served.server.port, [path], calling=CALLING, extra=(flag,))
    assert res.returncode == 0, res.stdout + res.stderr
    got = _stored(env, source.SOPInstanceUID)
    assert len(got) == 1
    # storescu re-encodes the dataset it read (sequence and item lengths), so the file is
    # no oracle for the bytes on the wire: pynetdicom's header, then the same elements
    # and values (the exact bytes of a compressed dataset: the hand-made PDU test below).
    meta = _expected(source.SOPClassUID, source.SOPInstanceUID,
                     source.file_meta.TransferSyntaxUID, b"")
    assert got[0].startswith(meta)
    stored = dcmread(BytesIO(got[0]))
    assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    # (dcmtk re-fragments encapsulated pixel data too: compared without it)
    assert ([(e.tag, e.VR, e.value) for e in stored if e.tag not in (PIXEL_DATA, PADDING)]
            == [(e.tag, e.VR, e.value) for e in source if e.tag not in (PIXEL_DATA, PADDING)])


def test_compressed_dataset_in_hand_made_pdus_is_stored_byte_identical(env: Env) -> None:
    source = dcmread(get_testdata_file("JPGExtended.dcm"))  # type: ignore[arg-type]
    source.SOPInstanceUID = generate_uid()
    syntax = str(source.file_meta.TransferSyntaxUID)
    path = env.root / "hand-made.dcm"
    source.save_as(path, enforce_file_format=True)
    data = _dataset_part(path)
    scu = RawSCU(env.served.server.port, [(source.SOPClassUID, [syntax])])
    try:
        cx = scu.cid(source.SOPClassUID, syntax)
        scu.pause()
        third = len(data) // 3
        scu.send(_pdata(_pdv(cx, 0x03, _store_cmd(source.SOPClassUID, source.SOPInstanceUID)),
                        _pdv(cx, 0x00, data[:third])))
        scu.send(_pdata(_pdv(cx, 0x00, data[third:2 * third]), _pdv(cx, 0x02, data[2 * third:])))
        assert scu.response().Status == 0x0000
    finally:
        scu.close()
    assert _stored(env, source.SOPInstanceUID) == [
        _expected(source.SOPClassUID, source.SOPInstanceUID, syntax, data)]


@pytest.mark.slow
def test_dcmtk_storescu_over_tls_with_client_certificate(env: Env) -> None:
    certs, ca = env.root / "certs", env.vault.data / "tls" / "ca.crt"
    tls = ("+tls", str(certs / f"{CERTMOD}.key"), str(certs / f"{CERTMOD}.crt"), "-pw",
           "+cf", str(ca))
    paths = [env.root / f"tls-{k}.dcm" for k in range(2)]
    datasets = [_ct(path, rows=320)[0] for path in paths]
    res = storescu(env.served.server.tls_port, paths, calling=CERTMOD, tls=tls,
                   extra=("-pdu", "16385"))
    assert res.returncode == 0, res.stdout + res.stderr
    for ds, path in zip(datasets, paths, strict=True):
        want = _expected(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                         _dataset_part(path))
        assert _stored(env, ds.SOPInstanceUID) == [want]
        # the index's digest is the stored bytes' own (a re-send is compared with it)
        assert _indexed_digest(env, ds.SOPInstanceUID) == hashlib.sha256(want).digest()


# --- hand-made PDUs over a pynetdicom association ---------------------------------------


def test_many_pdvs_same_pdu_and_several_contexts(env: Env) -> None:
    """A dataset in 97 PDVs over 10 PDUs, its command in the first one; an implicit VR
    image on a second context; a C-ECHO in the PDU that ends a dataset; a C-ECHO after."""
    scu = RawSCU(env.served.server.port, [(CTImageStorage, [ExplicitVRLittleEndian]),
                                          (MRImageStorage, [ImplicitVRLittleEndian]),
                                          (Verification, [ImplicitVRLittleEndian])])
    try:
        ct_cx = scu.cid(CTImageStorage, ExplicitVRLittleEndian)
        mr_cx = scu.cid(MRImageStorage, ImplicitVRLittleEndian)
        echo_cx = scu.cid(Verification, ImplicitVRLittleEndian)
        ct, ct_bytes = _ct(rows=128)
        mr, mr_bytes = _ct(rows=96, syntax=ImplicitVRLittleEndian, sop_class=MRImageStorage)
        scu.pause()
        # CT: command + 9 fragments in the first PDU, then 9 PDUs of 10 fragments
        step = -(-len(ct_bytes) // 97)
        pieces = [ct_bytes[i:i + step] for i in range(0, len(ct_bytes), step)]
        pdvs = [_pdv(ct_cx, 0x03, _store_cmd(CTImageStorage, ct.SOPInstanceUID, 1))]
        pdvs += [_pdv(ct_cx, 0x02 if k == len(pieces) - 1 else 0x00, p)
                 for k, p in enumerate(pieces)]
        for start in range(0, len(pdvs), 10):
            scu.send(_pdata(*pdvs[start:start + 10]))
        rsp = scu.response()
        assert isinstance(rsp, C_STORE) and rsp.Status == 0x0000
        assert rsp.MessageIDBeingRespondedTo == 1
        # MR on its own context, command alone, then the last fragment + a C-ECHO request
        scu.send(_pdata(_pdv(mr_cx, 0x03, _store_cmd(MRImageStorage, mr.SOPInstanceUID, 2))))
        half = len(mr_bytes) // 2
        scu.send(_pdata(_pdv(mr_cx, 0x00, mr_bytes[:half])))
        scu.send(_pdata(_pdv(mr_cx, 0x02, mr_bytes[half:]), _pdv(echo_cx, 0x03, _echo_cmd(3))))
        first, second = scu.response(), scu.response()
        assert isinstance(first, C_STORE) and first.Status == 0x0000
        assert isinstance(second, C_ECHO) and second.Status == 0x0000
        scu.assoc._reactor_checkpoint.set()
        assert scu.assoc.send_c_echo().Status == 0x0000
    finally:
        scu.close()
    assert _stored(env, ct.SOPInstanceUID) == [
        _expected(CTImageStorage, ct.SOPInstanceUID, ExplicitVRLittleEndian, ct_bytes)]
    assert _stored(env, mr.SOPInstanceUID) == [
        _expected(MRImageStorage, mr.SOPInstanceUID, ImplicitVRLittleEndian, mr_bytes)]


@pytest.mark.parametrize("defect", ["pdv-length", "command-inside-dataset", "other-context",
                                    "peer-abort", "peer-close"])
def test_broken_or_interrupted_dataset_stores_nothing(env: Env, defect: str) -> None:
    scu = RawSCU(env.served.server.port, [(CTImageStorage, [ExplicitVRLittleEndian]),
                                          (MRImageStorage, [ExplicitVRLittleEndian])])
    cx = scu.cid(CTImageStorage, ExplicitVRLittleEndian)
    other = scu.cid(MRImageStorage, ExplicitVRLittleEndian)
    ds, data = _ct(rows=64)
    scu.pause()
    scu.send(_pdata(_pdv(cx, 0x03, _store_cmd(CTImageStorage, ds.SOPInstanceUID)),
                    _pdv(cx, 0x00, data[:1000])))
    if defect == "pdv-length":  # the PDV claims more than its PDU holds
        tail = _pdv(cx, 0x02, data[1000:])
        broken = struct.pack(">L", len(tail) - 4 + 10) + tail[4:]
        scu.send(struct.pack(">BBL", 4, 0, len(broken)) + broken)
    elif defect == "command-inside-dataset":
        scu.send(_pdata(_pdv(cx, 0x03, _echo_cmd(5))))
    elif defect == "other-context":
        scu.send(_pdata(_pdv(other, 0x02, data[1000:])))
    elif defect == "peer-abort":
        scu.assoc._reactor_checkpoint.set()
        scu.assoc.abort()
    else:
        scu.assoc.dul.socket.socket.close()  # type: ignore[union-attr]
    scu.assoc._reactor_checkpoint.set()  # its reactor notices the A-ABORT (or the close)
    if defect.startswith("peer"):
        assert wait_until(lambda: scu.assoc.is_aborted or not scu.assoc.is_established, 10,
                          0.05)
    else:
        assert wait_until(lambda: scu.assoc.is_aborted, 10, 0.05)  # A-ABORT from the server
    time.sleep(0.3)
    assert _stored(env, ds.SOPInstanceUID) == []
    # the association's slot is back (two in all): two new associations are accepted
    again = [RawSCU(env.served.server.port, [(Verification, [ImplicitVRLittleEndian])])
             for _ in range(2)]
    for scu2 in again:
        assert scu2.assoc.send_c_echo().Status == 0x0000
        scu2.close()
    assert env.served.server.alive()


def test_asynchronous_operations_window_is_negotiated_to_one(env: Env) -> None:
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    scu = RawSCU(env.served.server.port, [(CTImageStorage, [ExplicitVRLittleEndian])],
                 ext_neg=[window])
    try:
        # pynetdicom's acceptor does not take the item: the default (1, 1) applies
        assert scu.assoc.acceptor.asynchronous_operations == (1, 1)
        ds, _ = _ct(rows=64)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        scu.assoc._reactor_checkpoint.set()
        assert scu.assoc.send_c_store(ds).Status == 0x0000
    finally:
        scu.close()
    assert len(_stored(env, ds.SOPInstanceUID)) == 1


# --- the same requests on both paths, in-process -----------------------------------------


def _serve_once(root: Path, fast: bool, max_pdu: int, monkeypatch: pytest.MonkeyPatch,
                images: list[tuple[Dataset, bytes]]) -> tuple[list[bytes], int, list[Any]]:
    """One vault served in-process with the direct path on or off; a pynetdicom SCU sends
    ``images`` on one association. (stored streams, direct-path requests, store records)"""
    from pacsvault.dicom import reactor
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    monkeypatch.setattr(reactor, "FAST_STORE", fast)
    taken = [0]
    original = reactor.FastAssociation._pv_fast_store

    def counted(self: Any, msg: Any) -> None:
        taken[0] += 1
        original(self, msg)

    monkeypatch.setattr(reactor.FastAssociation, "_pv_fast_store", counted)
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(CALLING, "127.0.0.1")
    service = DicomService(vault)
    service.ae.maximum_pdu_size = max_pdu
    ports = service.start("127.0.0.1", 0, None)
    try:
        ae = ClientAE(ae_title=CALLING)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
        assoc = ae.associate("127.0.0.1", ports["dicom_port"], ae_title="PACSVAULT")
        assert assoc.is_established
        for ds, _ in images:
            assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert wait_until(lambda: any(r.action == "dicom.store.association"
                                      for r in vault.audit.records()), 10, 0.05)
        vault.archive.settle()
        stored = [vault.archive.read(next(vault.archive.locate(sop_uid=ds.SOPInstanceUID)))
                  for ds, _ in images]
        records = [(r.action, r.outcome, sorted(r.detail.items()))
                   for r in vault.audit.records() if r.action.startswith("dicom.store")]
    finally:
        service.stop()
        vault.close()
    return stored, taken[0], records


@pytest.mark.slow
@pytest.mark.parametrize("max_pdu", [4096, 16385, 0])
def test_both_paths_store_the_same_bytes_and_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_pdu: int) -> None:
    images = [_ct(rows=rows) for rows in (64, 200)]
    for ds, _ in images:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fast, taken, fast_records = _serve_once(tmp_path / "fast", True, max_pdu, monkeypatch,
                                            images)
    slow, untaken, slow_records = _serve_once(tmp_path / "slow", False, max_pdu, monkeypatch,
                                              images)
    assert (taken, untaken) == (len(images), 0)
    assert fast == slow
    for stream, (ds, _) in zip(fast, images, strict=True):
        assert stream.startswith(_expected(CTImageStorage, ds.SOPInstanceUID,
                                           ExplicitVRLittleEndian, b""))
        assert dcmread(BytesIO(stream)).PixelData == ds.PixelData
    assert fast_records == slow_records


@pytest.mark.slow
def test_gdcmscu_store_is_received_as_sent(env: Env) -> None:
    """GDCM's ``gdcmscu`` as the sender (it aborts at association release here, see
    interop notes: its exit status is not the verdict, what was stored is)."""
    import shutil
    import subprocess

    tool = shutil.which("gdcmscu")
    if tool is None:
        pytest.skip("gdcmscu not installed")
    path = env.root / "gdcm.dcm"
    ds, _ = _ct(path, rows=240)
    subprocess.run([tool, "--store", "--call", "PACSVAULT", "--aetitle", CALLING,
                    "127.0.0.1", str(env.served.server.port), str(path)],
                   capture_output=True, timeout=60, check=False)
    assert wait_until(lambda: _stored(env, ds.SOPInstanceUID), 10)
    got = _stored(env, ds.SOPInstanceUID)
    assert len(got) == 1
    syntax = dcmread(BytesIO(got[0]), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert got[0].startswith(_expected(CTImageStorage, ds.SOPInstanceUID, syntax, b""))
    stored = dcmread(BytesIO(got[0]))
    if syntax == ExplicitVRLittleEndian:
        assert got[0].endswith(_dataset_part(path))
    assert [(e.tag, e.value) for e in stored] == [(e.tag, e.value) for e in ds]
