"""Issue 17: the direct C-STORE receive path over DICOM TLS, where TLS records and PDUs
do not line up (``reactor.BulkSocket`` reads one record per ``recv_into`` call).

With a client certificate (mutual TLS, the node registered ``--tls --client-cert``):
the C-STORE-RSP is pynetdicom's PDU; images sent as hand-made P-DATA-TF PDUs whose TLS
records cut them anywhere (odd PDU sizes, records of 1, 7 and 4,099 bytes, a record holding
the end of one PDU and the start of the next) are stored byte for byte; an abort or a close
in the middle of a PDU stores nothing, and the server goes on over TLS. dcmtk's TLS store is
in ``test_store_fastpath_conformance``.

By a hand-made TLS requestor (``BioTLS``, records chosen one by one): records of 1 byte to
16 KiB store byte for byte, with pynetdicom's C-STORE-RSP; a close_notify in the middle of
a PDU, or a connection cut in the middle of a record, stores nothing and the server goes on.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE as ClientAE
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pacsvault.dicom.storewire import encode_store_rsp
from tests.helpers import wait_until

CALLING = "TLSRECORDS"
LOCAL = "127.0.0.1"


@dataclass
class Env:
    vault: Any
    port: int
    certs: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from pacsvault.crypto.tls import issue_node
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    root = tmp_path_factory.mktemp("tlsrecords")
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(CALLING, LOCAL, tls=True, client_cert=True)
    issued = issue_node(vault.layout.tls, vault.tls_password(), CALLING, LOCAL,
                        root / "certs")
    vault.nodes.record_certificates(CALLING, issued)
    service = DicomService(vault)
    ports = service.start(LOCAL, None, 0)
    try:
        yield Env(vault, ports["dicom_tls_port"], root / "certs")
    finally:
        service.stop()
        vault.close()


def _client_context(env: Env) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(env.certs / "ca.crt"))
    ctx.load_cert_chain(env.certs / f"{CALLING}.crt", env.certs / f"{CALLING}.key")
    return ctx


def _associate(env: Env, handlers: list[Any] | None = None) -> Any:
    ae = ClientAE(ae_title=CALLING)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    assoc = ae.associate(LOCAL, env.port, ae_title="PACSVAULT",
                         tls_args=(_client_context(env), LOCAL), evt_handlers=handlers)
    assert assoc.is_established
    assert assoc.dul.socket.socket.getpeercert()  # type: ignore[union-attr]
    return assoc


def _image(rows: int = 8) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TLS-1"
    ds.PatientName = "Tls^Direct"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256) + bytes(rows * rows * 2 % 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _dataset_bytes(ds: Dataset) -> bytes:
    """The dataset as pynetdicom's ``send_c_store`` encodes it (no file meta)."""
    data = encode(ds, False, True)
    assert data is not None
    return data


def _expected(ds: Dataset, data: bytes) -> bytes:
    """pynetdicom's Part 10 stream of a received dataset (its file meta, then the bytes)."""
    meta = create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                            transfer_syntax=ExplicitVRLittleEndian)
    return b"DICM".rjust(132, b"\x00") + encode_file_meta(meta) + data


def _stored(env: Env, sop_uid: str) -> list[bytes]:
    archive = env.vault.archive
    return [archive.read(item) for item in archive.locate(sop_uid=sop_uid)]


def _store_cmd(ds: Dataset, message_id: int) -> bytes:
    def ui(elem: int, uid: str) -> bytes:
        value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
        return struct.pack("<HHI", 0, elem, len(value)) + value

    def us(elem: int, value: int) -> bytes:
        return struct.pack("<HHIH", 0, elem, 2, value)

    body = (ui(0x0002, ds.SOPClassUID) + us(0x0100, 0x0001) + us(0x0110, message_id)
            + us(0x0700, 0) + us(0x0800, 0x0000) + ui(0x1000, ds.SOPInstanceUID))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _pdus(cid: int, command: bytes, data: bytes, max_pdu: int) -> bytes:
    """The request as P-DATA-TF PDUs of at most ``max_pdu`` bytes (one PDV each)."""
    def pdu(header: int, fragment: bytes) -> bytes:
        pdv = struct.pack(">LBB", len(fragment) + 2, cid, header) + fragment
        return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv

    step = max_pdu - 6
    out = [pdu(0x03, command)]
    for at in range(0, len(data), step):
        out.append(pdu(0x02 if at + step >= len(data) else 0x00, data[at:at + step]))
    return b"".join(out)


def _rsp_pdu(cid: int, ds: Dataset, message_id: int) -> bytes:
    primitive = P_DATA()
    command = encode_store_rsp(message_id, CTImageStorage, ds.SOPInstanceUID, 0x0000)
    primitive.presentation_data_value_list = [[cid, b"\x03" + command]]  # type: ignore[list-item]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _records(stream: bytes, sizes: tuple[int, ...]) -> Iterator[bytes]:
    """``stream`` cut into pieces of the given sizes in turn (one TLS record each)."""
    at, k = 0, 0
    while at < len(stream):
        size = sizes[k % len(sizes)]
        yield stream[at:at + size]
        at, k = at + size, k + 1


class RawTLS:
    """A pynetdicom association over TLS whose P-DATA-TF PDUs are written by hand on the
    SSL socket (one ``sendall`` = one TLS record) while its reactor is paused."""

    def __init__(self, env: Env) -> None:
        self.assoc = _associate(env)
        self.cid = int(self.assoc.accepted_contexts[0].context_id)
        self.assoc._reactor_checkpoint.clear()
        assert wait_until(lambda: self.assoc._is_paused, 5, 0.001)
        self.sock = self.assoc.dul.socket.socket

    def send(self, stream: bytes, sizes: tuple[int, ...]) -> None:
        for record in _records(stream, sizes):
            self.sock.sendall(record)

    def response(self) -> Any:
        _, rsp = self.assoc.dimse.get_msg(block=True)
        return rsp

    def close(self) -> None:
        self.assoc._reactor_checkpoint.set()
        if self.assoc.is_established:
            self.assoc.release()


# --- the tests --------------------------------------------------------------------------


def test_responses_over_tls_are_pynetdicoms_pdus(env: Env) -> None:
    received: list[bytes] = []
    assoc = _associate(env, [(evt.EVT_DATA_RECV,
                              lambda event: received.append(bytes(event.data)))])
    cid = int(assoc.accepted_contexts[0].context_id)
    images = [_image(rows) for rows in (8, 64, 256)]
    try:
        for ds in images:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    stream = b"".join(received)
    pdus, at = [], 0
    while at + 6 <= len(stream):
        (length,) = struct.unpack(">L", stream[at + 2:at + 6])
        if stream[at] == 0x04:
            pdus.append(stream[at:at + 6 + length])
        at += 6 + length
    assert pdus == [_rsp_pdu(cid, ds, 1) for ds in images]
    for ds in images:
        assert _stored(env, ds.SOPInstanceUID) == [_expected(ds, _dataset_bytes(ds))]


@pytest.mark.parametrize(("max_pdu", "records"), [
    (16385, (16384,)),          # odd PDU size, full records: a PDU across two records
    (4099, (1, 7, 4099)),       # records of 1 and 7 bytes: PDU headers split in records
    (131072, (65537, 3)),       # a record holding one PDU's end and the next one's start
])
def test_pdus_cut_anywhere_by_tls_records_store_byte_identical(
        env: Env, max_pdu: int, records: tuple[int, ...]) -> None:
    scu = RawTLS(env)
    try:
        images = [_image(rows) for rows in (48, 200)]
        for k, ds in enumerate(images, start=1):
            data = _dataset_bytes(ds)
            scu.send(_pdus(scu.cid, _store_cmd(ds, k), data, max_pdu), records)
            rsp = scu.response()
            assert isinstance(rsp, C_STORE) and rsp.Status == 0x0000
            assert rsp.MessageIDBeingRespondedTo == k
            assert _stored(env, ds.SOPInstanceUID) == [_expected(ds, data)]
    finally:
        scu.close()


@pytest.mark.parametrize("defect", ["abort", "close"])
def test_abort_or_close_mid_pdu_over_tls_stores_nothing(env: Env, defect: str) -> None:
    scu = RawTLS(env)
    ds = _image(128)
    stream = _pdus(scu.cid, _store_cmd(ds, 1), _dataset_bytes(ds), 8192)
    scu.send(stream[:len(stream) // 2 + 5], (1000,))  # ends inside a PDU
    if defect == "abort":
        scu.assoc._reactor_checkpoint.set()
        scu.assoc.abort()
    else:
        scu.sock.close()
        scu.assoc._reactor_checkpoint.set()
    assert wait_until(lambda: scu.assoc.is_aborted or not scu.assoc.is_established, 10, 0.05)
    time.sleep(0.3)
    assert _stored(env, ds.SOPInstanceUID) == []
    after = _associate(env)  # the server goes on over TLS
    try:
        ok = _image()
        assert after.send_c_store(ok).Status == 0x0000
    finally:
        after.release()
    assert _stored(env, ok.SOPInstanceUID) == [_expected(ok, _dataset_bytes(ok))]


# --- records chosen one by one (a hand-made TLS requestor) ------------------------------


def _associate_rq() -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = CALLING
    primitive.called_ae_title = "PACSVAULT"
    length = MaximumLengthNotification()
    length.maximum_length_received = 0
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [length, implementation]
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


class BioTLS:
    """A DICOM TLS requestor by hand: ``ssl.SSLObject`` over a TCP socket, so the test
    decides every record (its size, half of one, a close_notify)."""

    def __init__(self, env: Env, ctx: ssl.SSLContext | None = None) -> None:
        self.raw = socket.create_connection((LOCAL, env.port), timeout=20)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = (ctx or _client_context(env)).wrap_bio(
            self.incoming, self.outgoing, server_hostname=LOCAL)
        self.plain = bytearray()
        self._io(self.tls.do_handshake)
        self.raw.sendall(self.encrypt(_associate_rq(), (1 << 14,)))
        assert self.read_pdu()[0] == 0x02  # A-ASSOCIATE-AC
        self.cid = 1

    def _io(self, op: Any) -> Any:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                self.flush()
                data = self.raw.recv(1 << 16)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            self.flush()
            return result

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.raw.sendall(data)

    def encrypt(self, stream: bytes, sizes: tuple[int, ...]) -> bytes:
        """``stream`` as TLS records of the given plaintext sizes in turn."""
        for record in _records(stream, sizes):
            self.tls.write(record)
        return self.outgoing.read()

    def read_pdu(self) -> bytes:
        def take(n: int) -> bytes:
            while len(self.plain) < n:
                self.plain += self._io(lambda: self.tls.read(1 << 16))
            out = bytes(self.plain[:n])
            del self.plain[:n]
            return out

        header = take(6)
        return header + take(struct.unpack(">L", header[2:])[0])

    def close(self) -> None:
        self.raw.close()


def test_tiny_and_full_records_store_byte_identical(env: Env) -> None:
    scu = BioTLS(env)
    try:
        # tiny records, full ones, a PDU header alone, records ending mid-header
        for k, (rows, sizes) in enumerate([(8, (1, 7, 3)), (200, (6, 16384)),
                                           (256, (16384, 5, 11, 4099))], start=1):
            ds = _image(rows)
            data = _dataset_bytes(ds)
            stream = _pdus(scu.cid, _store_cmd(ds, k), data, 16385)
            scu.raw.sendall(scu.encrypt(stream, sizes))
            assert scu.read_pdu() == _rsp_pdu(scu.cid, ds, k)
            assert _stored(env, ds.SOPInstanceUID) == [_expected(ds, data)]
    finally:
        scu.close()


@pytest.mark.parametrize("defect", ["close_notify", "abrupt_mid_record"])
def test_close_mid_pdu_over_tls_stores_nothing(env: Env, defect: str) -> None:
    scu = BioTLS(env)
    ds = _image(128)
    stream = _pdus(scu.cid, _store_cmd(ds, 1), _dataset_bytes(ds), 8192)
    wire = scu.encrypt(stream[:len(stream) // 2 + 5], (1000,))
    if defect == "close_notify":
        scu.raw.sendall(wire)
        with contextlib.suppress(ssl.SSLWantReadError):
            scu.tls.unwrap()
        scu.flush()
        scu.raw.shutdown(socket.SHUT_WR)
        # the server ends the connection (it was owed the rest of the PDU)
        while True:
            with contextlib.suppress(ConnectionError):
                if scu.raw.recv(1 << 16):
                    continue
            break
    else:
        scu.raw.sendall(wire[:-10])  # the last record cut short
    scu.close()
    time.sleep(0.3)
    assert _stored(env, ds.SOPInstanceUID) == []
    after = BioTLS(env)  # the server goes on over TLS
    try:
        ok = _image()
        data = _dataset_bytes(ok)
        after.raw.sendall(after.encrypt(_pdus(after.cid, _store_cmd(ok, 1), data, 4099),
                                        (4099,)))
        assert after.read_pdu() == _rsp_pdu(after.cid, ok, 1)
    finally:
        after.close()
    assert _stored(env, ok.SOPInstanceUID) == [_expected(ok, data)]
