"""Issue 13, defect 9: the same instance re-sent in another encoding is a benign duplicate.

After an Orthanc round trip (Explicit -> Implicit VR Little Endian), or decompressed, or
losslessly recompressed, a modality or a workstation sends an instance the archive already
holds, with other bytes but the same attributes and the same pixels. That used to be a B006
warning plus a security event. Now (keep-first still: the stored object is never changed):

* same decoded dataset -> success 0000 and an informational ``dicom.store.duplicate`` record,
  no ``dicom.store.conflict`` event, still one stored object byte-equal to the first;
* a changed attribute -> B006 and the security event, as before.

Against the real server with pynetdicom; plus the comparison itself in-process for the
cases a network test would make slow (pixel change under RLE, lossy, size limit).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association

from pacsvault.storage import sameness
from pacsvault.vault import Vault
from tests.helpers import AE as SERVER_AE
from tests.helpers import Server, VaultDir, events, make_vault, start_server

CALLING = "MODALITY"
SUCCESS = 0x0000
WARNING_DISCARDED = 0xB006
TRAILING_PADDING = 0xFFFCFFFC


def ct_small(**changes: str) -> Dataset:
    """CT_small (Explicit VR Little Endian) with fresh UIDs."""
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    ds = dcmread(source)
    del ds[TRAILING_PADDING]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def encoded(ds: Dataset, syntax: str) -> bytes:
    """``ds`` as a Part 10 stream in ``syntax`` (RLE: pydicom's own encoder)."""
    copy = Dataset(deepcopy(ds))  # a plain Dataset: pydicom may write it in any endianness
    copy.file_meta = deepcopy(ds.file_meta)
    copy.preamble = b"\0" * 128
    if syntax == RLELossless:
        copy.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        if syntax == ExplicitVRBigEndian:  # pydicom writes OW bytes as they are: swap them
            copy.PixelData = ds.pixel_array.astype(">u2").tobytes()
        copy.file_meta.TransferSyntaxUID = UID(syntax)
        copy["PixelData"].VR = "OW"
    out = DicomBytesIO()
    copy.save_as(out, enforce_file_format=True)
    return bytes(out.getvalue())


def write(tmp: Path, name: str, raw: bytes) -> Path:
    path = tmp / name
    path.write_bytes(raw)
    return path


@contextmanager
def association(port: int, syntax: str) -> Iterator[Association]:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", syntax)  # CT Image Storage
    assoc = ae.associate("127.0.0.1", port, ae_title=SERVER_AE)
    assert assoc.is_established, "association refused or failed"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def send(port: int, path: Path, syntax: str) -> int:
    """One C-STORE of the file's dataset bytes, verbatim, in a context of ``syntax``."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with association(port, syntax) as assoc:
            rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
    assert "Status" in rsp, "no C-STORE response (association dropped?)"
    return int(rsp.Status)


def dataset_part(raw: bytes) -> bytes:
    """Everything after the preamble and the file meta group (which the server writes)."""
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", raw[140:144])  # (0002,0000) UL comes first
    return raw[144 + group_len:]


def stored(vault: VaultDir, sop_uid: str) -> list[bytes]:
    """The instances kept under ``sop_uid``, decrypted in-process (as ``export`` would),
    without their file meta."""
    v = Vault.open(vault.data, vault.key)
    try:
        return [dataset_part(v.archive.read(item))
                for item in v.archive.locate(sop_uid=sop_uid)]
    finally:
        v.close()


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    v = make_vault(tmp_path_factory.mktemp("reencoded") / "v")
    v.add_node(CALLING)
    return v


@pytest.fixture(scope="module")
def server(vault: VaultDir) -> Iterator[Server]:
    srv = start_server(vault)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_reencoded_resend_is_a_benign_duplicate(
        server: Server, vault: VaultDir, tmp_path: Path) -> None:
    ds = ct_small()
    sop = str(ds.SOPInstanceUID)
    first = encoded(ds, ExplicitVRLittleEndian)
    implicit = encoded(ds, ImplicitVRLittleEndian)
    rle = encoded(ds, RLELossless)
    assert len({first, implicit, rle}) == 3

    assert send(server.port, write(tmp_path, "first.dcm", first), ExplicitVRLittleEndian) \
        == SUCCESS
    assert send(server.port, write(tmp_path, "implicit.dcm", implicit),
                ImplicitVRLittleEndian) == SUCCESS
    assert send(server.port, write(tmp_path, "rle.dcm", rle), RLELossless) == SUCCESS

    kept = stored(vault, sop)
    assert kept == [dataset_part(first)]  # one object, still the first one's bytes
    assert not [e for e in events(vault, "dicom.store.conflict") if e["sop_uids"] == [sop]]
    duplicates = [e for e in events(vault, "dicom.store.duplicate") if e["sop_uids"] == [sop]]
    assert len(duplicates) == 2, duplicates
    for event in duplicates:
        assert event["sop_uids"] == [sop] and event["ae"] == CALLING
        assert event["code"] == "110107" and event["outcome"] == "success"
        assert event["reencoded"] is True
        assert event["stored_syntax"] == ExplicitVRLittleEndian
    assert {e["received_syntax"] for e in duplicates} == {ImplicitVRLittleEndian, RLELossless}


@pytest.mark.slow
def test_reencoded_resend_with_another_name_is_still_a_conflict(
        server: Server, vault: VaultDir, tmp_path: Path) -> None:
    ds = ct_small()
    sop = str(ds.SOPInstanceUID)
    first = encoded(ds, ExplicitVRLittleEndian)
    assert send(server.port, write(tmp_path, "first.dcm", first), ExplicitVRLittleEndian) \
        == SUCCESS
    ds.PatientName = "Someone^Else"
    changed = write(tmp_path, "changed.dcm", encoded(ds, ImplicitVRLittleEndian))
    assert send(server.port, changed, ImplicitVRLittleEndian) == WARNING_DISCARDED
    assert stored(vault, sop) == [dataset_part(first)]
    conflicts = [e for e in events(vault, "dicom.store.conflict") if e["sop_uids"] == [sop]]
    assert len(conflicts) == 1 and conflicts[0]["code"] == "110113"
    assert not [e for e in events(vault, "dicom.store.duplicate") if e["sop_uids"] == [sop]]


# --- the comparison itself ---------------------------------------------------------------


def test_same_dataset_in_every_lossless_encoding() -> None:
    ds = ct_small()
    first = encoded(ds, ExplicitVRLittleEndian)
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless):
        assert sameness.same_instance(first, encoded(ds, syntax)).same, syntax
        assert sameness.same_instance(encoded(ds, syntax), first).same, syntax


def test_any_difference_is_a_conflict() -> None:
    ds = ct_small()
    first = encoded(ds, ExplicitVRLittleEndian)
    # one pixel, under RLE (compared decoded)
    pixels = ds.pixel_array.copy()
    pixels[10, 10] += 1
    other = ct_small()
    other.SOPInstanceUID = ds.SOPInstanceUID
    other.StudyInstanceUID, other.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    other.PixelData = pixels.tobytes()
    assert not sameness.same_instance(first, encoded(other, RLELossless)).same
    # one attribute, in another encoding
    renamed = deepcopy(ds)
    renamed.PatientName = "Someone^Else"
    assert not sameness.same_instance(first, encoded(renamed, ImplicitVRLittleEndian)).same
    # an attribute more
    more = deepcopy(ds)
    more.ImageComments = "re-read"
    assert not sameness.same_instance(first, encoded(more, ImplicitVRLittleEndian)).same


def test_lossy_and_oversized_are_never_the_same() -> None:
    # a lossy JPEG and its own decompression: same attributes, same decoded pixels, but
    # the encoding lost information, so not "the same object"
    source = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert isinstance(source, str)
    jpeg = dcmread(source)
    assert jpeg.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    original = Path(source).read_bytes()
    jpeg.decompress(as_rgb=False, generate_instance_uid=False)
    out = DicomBytesIO()
    jpeg.save_as(out, enforce_file_format=True)
    verdict = sameness.same_instance(original, bytes(out.getvalue()))
    assert not verdict.same and verdict.reason in ("lossy", "attributes"), verdict
    ds = ct_small()
    first = encoded(ds, ExplicitVRLittleEndian)
    big = sameness.same_instance(first, encoded(ds, ImplicitVRLittleEndian),
                                 max_bytes=len(first) - 1)
    assert not big.same and big.reason == "too large"
    tiny = sameness.same_instance(first, encoded(ds, RLELossless), max_pixel_bytes=1024)
    assert not tiny.same and tiny.reason == "too large"


def test_archive_store_records_a_reencoded_dicomweb_duplicate(tmp_path: Path) -> None:
    """The archive itself (the STOW-RS path: no AE, a user): the re-encoded re-send is a
    duplicate, recorded as ``dicomweb.store.duplicate``; the stored object is unchanged."""
    vault = make_vault(tmp_path / "v")
    ds = ct_small()
    sop = str(ds.SOPInstanceUID)
    first = encoded(ds, ExplicitVRLittleEndian)
    v = Vault.open(vault.data, vault.key)
    try:
        assert v.archive.store(first, actor_user="admin").status.value == "stored"
        again = v.archive.store(encoded(ds, ExplicitVRBigEndian), actor_user="admin")
        assert again.status.value == "duplicate"
        renamed = deepcopy(ds)
        renamed.PatientName = "Someone^Else"
        other = v.archive.store(encoded(renamed, RLELossless), actor_user="admin")
        assert other.status.value == "conflict"
        v.archive.settle()
        assert [v.archive.read(i) for i in v.archive.locate(sop_uid=sop)] == [first]
    finally:
        v.close()
    (event,) = events(vault, "dicomweb.store.duplicate")
    assert event["user"] == "admin" and event["sop_uids"] == [sop]
    assert event["received_syntax"] == ExplicitVRBigEndian
