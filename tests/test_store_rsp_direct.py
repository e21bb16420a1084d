"""Issue 17: the direct C-STORE path's response is written by the association thread
(``sendpath.write_now``) instead of being queued to the DUL thread; the peer receives the
same bytes as pynetdicom's P-DATA path sends (one P-DATA-TF PDU, one last-command PDV)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE as ClientAE
from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pacsvault.dicom import sendpath
from pacsvault.dicom.storewire import encode_store_rsp
from tests.helpers import wait_until

CALLING = "RSPDIRECT"


def _image() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "RSP-1"
    ds.PatientName = "Rsp^Direct"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _pdus(stream: bytes) -> list[bytes]:
    out, at = [], 0
    while at + 6 <= len(stream):
        (length,) = struct.unpack(">L", stream[at + 2:at + 6])
        out.append(stream[at:at + 6 + length])
        at += 6 + length
    return out


def _serve(root: Path, monkeypatch: pytest.MonkeyPatch, direct: bool,
           images: list[Dataset]) -> tuple[list[bytes], int, int]:
    """(the P-DATA-TF PDUs the SCU received, responses written directly, context id)."""
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    monkeypatch.setattr(sendpath, "ENABLED", direct)
    written = [0]
    original = sendpath.write_now

    def counted(dul: Any, wire: Any) -> bool:
        done = original(dul, wire)
        written[0] += int(done)
        return done

    monkeypatch.setattr(sendpath, "write_now", counted)
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(CALLING, "127.0.0.1")
    service = DicomService(vault)
    ports = service.start("127.0.0.1", 0, None)
    received: list[bytes] = []
    try:
        ae = ClientAE(ae_title=CALLING)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
        assoc = ae.associate("127.0.0.1", ports["dicom_port"], ae_title="PACSVAULT",
                             evt_handlers=[(evt.EVT_DATA_RECV,
                                            lambda event: received.append(bytes(event.data)))])
        assert assoc.is_established
        cid = int(assoc.accepted_contexts[0].context_id)  # type: ignore[arg-type]
        for ds in images:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert wait_until(lambda: any(r.action == "dicom.store.association"
                                      for r in vault.audit.records()), 10, 0.05)
        vault.archive.settle()
    finally:
        service.stop()
        vault.close()
    stream = b"".join(received)
    return [p for p in _pdus(stream) if p[0] == 0x04], written[0], cid


def _expected(cid: int, message_id: int, ds: Dataset) -> bytes:
    """pynetdicom's P-DATA-TF for the C-STORE-RSP (its own PDU encoder; pynetdicom's SCU
    sends every C-STORE-RQ with message ID 1)."""
    primitive = P_DATA()
    command = encode_store_rsp(message_id, CTImageStorage, ds.SOPInstanceUID, 0x0000)
    primitive.presentation_data_value_list = [[cid, b"\x03" + command]]  # type: ignore[list-item]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_store_response_written_directly_is_pynetdicoms_pdu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = [_image() for _ in range(3)]
    pdus, written, cid = _serve(tmp_path / "direct", monkeypatch, True, images)
    assert written == len(images)  # each response left from the association thread
    assert pdus == [_expected(cid, 1, ds) for ds in images]


def test_store_response_through_the_dul_is_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = [_image() for _ in range(2)]
    pdus, written, cid = _serve(tmp_path / "queued", monkeypatch, False, images)
    assert written == 0
    assert pdus == [_expected(cid, 1, ds) for ds in images]
