"""A peer that sends its A-RELEASE-RQ while a C-FIND's answers are still being produced
gets its A-RELEASE-RP, and the association ends at once.

pynetdicom 3.0's ``ServiceClass._wrap_handler`` looks for a release between a Q/R
handler's answers and *takes it off the DUL queue* (``ACSE.is_release_requested``); the
association loop, which answers a release, then never saw it: no A-RELEASE-RP, the peer
left waiting (a modality's association timeout) and the connection, with its slot of the
per-source budget, held until the idle timeout. ``listener.PolicyACSE`` keeps a taken
release requested until it is answered.

One vault served in-process; a requestor by hand on a raw socket, so that the release
really arrives while the answer is pending: the C-FIND handler starts its query only once
the server's DUL has taken the release (state Sta8), whatever the machine's load.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom.dimse_messages import C_FIND_RQ
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsvault.dicom import reactor
from tests.helpers import AE, wait_until

LOCAL = "127.0.0.1"
CALLING = "RELPENDING"
FIND = StudyRootQueryRetrieveInformationModelFind
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@dataclass
class Env:
    service: Any
    port: int


def _study(i: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = f"RELPEND^P{i}", f"RP-{i}"
    ds.StudyDate, ds.StudyTime, ds.Modality = f"2024020{i + 1}", "101010", "OT"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    root = tmp_path_factory.mktemp("relpending")
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(CALLING, LOCAL, roles=("query",))
    for i in range(3):
        vault.archive.store(_study(i), source_ae=CALLING)
    vault.archive.settle()
    service = DicomService(vault)
    ports = service.start(LOCAL, 0, 0)
    try:
        yield Env(service, ports["dicom_port"])
    finally:
        service.stop()
        vault.close()


def _associate_rq() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = CALLING
    primitive.called_ae_title = AE
    context = PresentationContext()
    context.context_id = 1
    context.abstract_syntax = FIND
    context.transfer_syntax = [ImplicitVRLittleEndian]
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.99"
    primitive.user_information = [length, implementation]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def _find_rq() -> bytes:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "RELPEND^*"
    identifier.StudyInstanceUID = identifier.PatientID = identifier.StudyDate = ""
    request = C_FIND()
    request.MessageID = 1
    request.AffectedSOPClassUID = FIND
    request.Priority = 2
    encoded = encode(identifier, True, True)
    assert encoded is not None
    request.Identifier = BytesIO(encoded)
    message = C_FIND_RQ()
    message.primitive_to_message(request)
    return b"".join(bytes(P_DATA_TF(p).encode()) for p in message.encode_msg(1, 16384))


def _read_pdu(sock: socket.socket) -> bytes:
    """One PDU, or b"" when the server closed."""
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        want = 6 + struct.unpack(">L", data[2:6])[0] if len(data) >= 6 else 6
        chunk = sock.recv(want - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _association_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, reactor.FastAssociation)]


def _gate_on_release(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C-FIND handler (the association thread) queries only once the DUL has taken
    the peer's A-RELEASE-RQ (Sta8): the answers are pending when the release arrives."""
    engine = env.service.qr.engine
    real = engine.find_json

    def gated(*args: Any, **kwargs: Any) -> Any:
        dul = threading.current_thread().dul  # type: ignore[attr-defined]
        assert wait_until(lambda: dul.state_machine.current_state == "Sta8", 10, 0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "find_json", gated)


def test_release_while_the_answer_is_pending_is_answered(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    _gate_on_release(env, monkeypatch)
    with socket.create_connection((LOCAL, env.port), timeout=10) as sock:
        sock.sendall(_associate_rq())
        assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(_find_rq() + RELEASE_RQ)
        pdus = []
        while (pdu := _read_pdu(sock)) and pdu != RELEASE_RP:
            pdus.append(pdu)
        # every answer the server sent is a P-DATA-TF (the final status last), then the
        # A-RELEASE-RP (before the fix: nothing more until the idle timeout, a timeout here)
        assert pdu == RELEASE_RP
        assert pdus and all(p[0] == 0x04 for p in pdus)
        assert _read_pdu(sock) == b""  # and the server closes
    assert wait_until(lambda: not _association_threads(), 10), _association_threads()


def test_the_next_association_is_served_as_usual(env: Env) -> None:
    """Nothing of the early release is left over: associate, C-FIND, release."""
    with socket.create_connection((LOCAL, env.port), timeout=10) as sock:
        sock.sendall(_associate_rq())
        assert _read_pdu(sock)[0] == 0x02
        sock.sendall(_find_rq())
        statuses = []
        while True:
            pdu = _read_pdu(sock)
            assert pdu[0] == 0x04
            # a command's last fragment (0x03): Status is its last element, (0000,0900)
            if pdu[11] == 0x03:
                statuses.append(struct.unpack("<H", pdu[-2:])[0])
                if statuses[-1] != 0xFF00:
                    break
        assert statuses == [0xFF00] * 3 + [0x0000]
        sock.sendall(RELEASE_RQ)
        assert _read_pdu(sock) == RELEASE_RP
        assert _read_pdu(sock) == b""  # the server closes
    # ended before the module's server stops (its shutdown aborts what is still running)
    assert wait_until(lambda: not _association_threads(), 10), _association_threads()
