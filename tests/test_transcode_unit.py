"""``dicom.transcode`` in isolation: Big Endian words swapped for their width, syntax choice.

Issue 13, defect 2 asks for pixel data swapped correctly for 16- and 32-bit samples (dcmtk
3.6.7 corrupts 32-bit Big Endian pixel data when converting), and for other word values
(OW lookup tables) too.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RTDoseStorage,
    generate_uid,
)
from pynetdicom.presentation import build_context

from pacsvault.dicom import transcode


def _big_endian(bits: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(bits)
    arr = rng.integers(0, 2 ** (bits - 1), size=(3, 5, 7), dtype=np.uint64).astype(f"u{bits // 8}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "RTDOSE"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 5, 7, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.DoseGridScaling = 0.001
    ds.add_new(0x7FE00010, "OW", arr.astype(f">u{bits // 8}").tobytes())
    ds.add_new(0x00091010, "OW", np.arange(6, dtype=">u2").tobytes())  # private OW words
    ds.add_new(0x00090010, "LO", "PVTEST")
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue(), arr


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_big_endian_pixels_and_words_swap_by_their_width(bits: int, target: str) -> None:
    raw, arr = _big_endian(bits)
    original = dcmread(io.BytesIO(raw))
    assert np.array_equal(original.pixel_array, arr)  # pydicom reads our BE object right
    out = transcode.convert(dcmread(io.BytesIO(raw)), target)
    assert out.file_meta.TransferSyntaxUID == target
    again = dcmread(io.BytesIO(_bytes(out)))
    assert np.array_equal(again.pixel_array, arr)
    assert again.pixel_array.dtype.byteorder in ("=", "<", "|")
    assert again[0x00091010].value == np.arange(6, dtype="<u2").tobytes()
    assert again.DoseGridScaling == original.DoseGridScaling
    assert again.NumberOfFrames == 3


def test_real_big_endian_file_converts_losslessly() -> None:
    path = str(get_testdata_file("MR_small_bigendian.dcm"))
    original = dcmread(path)
    out = dcmread(io.BytesIO(_bytes(transcode.convert(dcmread(path), ExplicitVRLittleEndian))))
    assert np.array_equal(out.pixel_array, original.pixel_array)
    for elem in original:
        if elem.tag != 0x7FE00010:
            assert out[elem.tag].value == elem.value, elem.tag


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _accepted(sop: str, *syntaxes: str) -> list:  # type: ignore[type-arg]
    contexts = []
    for n, ts in enumerate(syntaxes):
        cx = build_context(sop, [ts])
        cx.context_id = 2 * n + 1
        cx._as_scu = True
        contexts.append(cx)
    return contexts


def test_choose_prefers_stored_then_explicit_then_implicit_never_big_endian() -> None:
    sop = RTDoseStorage
    both = _accepted(sop, JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert transcode.choose(both, sop, JPEG2000Lossless) == JPEG2000Lossless
    plain = _accepted(sop, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert transcode.choose(plain, sop, JPEG2000Lossless) == ExplicitVRLittleEndian
    assert transcode.choose(_accepted(sop, ImplicitVRLittleEndian), sop,
                            JPEG2000Lossless) == ImplicitVRLittleEndian
    big = _accepted(sop, ExplicitVRBigEndian, ExplicitVRLittleEndian)
    assert transcode.choose(big, sop, ExplicitVRBigEndian) == ExplicitVRLittleEndian
    assert transcode.choose(_accepted(sop, JPEG2000Lossless), sop, ExplicitVRLittleEndian) is None
    assert transcode.choose(plain, "1.2.3.4", ExplicitVRLittleEndian) is None


def test_offered_puts_stored_pairs_first_and_never_big_endian() -> None:
    pairs = {(RTDoseStorage, JPEG2000Lossless), (RTDoseStorage, ExplicitVRBigEndian)}
    offered = transcode.offered(pairs)
    assert offered[0] == (RTDoseStorage, JPEG2000Lossless)
    assert (RTDoseStorage, ExplicitVRBigEndian) not in offered
    assert offered[1:] == [(RTDoseStorage, ExplicitVRLittleEndian),
                           (RTDoseStorage, ImplicitVRLittleEndian)]
