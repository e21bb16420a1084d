"""Is a re-sent instance the one already stored, only encoded differently? (issue 13, defect 9)

Why: keep-first compares the SHA-256 of the Part 10 stream, so the same instance after an
Orthanc round trip (Explicit -> Implicit VR), decompressed, or losslessly recompressed was
reported as a *different* object under an existing SOP Instance UID: a B006 warning and a
security event for nothing (5 of 80 in the field). ``same_instance`` decides instead from
the decoded datasets:

* every element except what only the encoding decides (the file meta group, group lengths,
  the trailing padding) must be present in both with equal values *after* pydicom decoding
  (so VR, endianness, length encoding and value padding do not matter); sequences item by
  item; an element that one side could only read as UN (Implicit VR, private) is compared
  by its Implicit VR Little Endian encoding;
* Pixel Data: byte-equal, or else decoded (``pixel_array`` without colour conversion) and
  array-equal, and only when both encodings are native or *lossless* compressed: anything
  lossy (or a syntax not known to be lossless) is never "the same" unless byte-equal;
* bounded: above ``MAX_BYTES`` per stream or ``MAX_PIXEL_BYTES`` of decoded pixels the
  comparison is skipped and the answer is "not the same" (the conservative conflict), and
  deflated streams are inflated within the vault's limit (``dicom.inflate``). Any error
  while decoding also answers "not the same".

The verdict never names a value: its reason is one of a few fixed words, safe to log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from pacsvault.dicomfile import parse as dicom_parse

MIB = 1024 * 1024
MAX_BYTES = 64 * MIB  # per Part 10 stream; above: not compared (conservative conflict)
MAX_PIXEL_BYTES = 256 * MIB  # per decoded pixel array

_PIXEL_DATA = 0x7FE00010
_TRAILING_PADDING = 0xFFFCFFFC
_LITTLE_NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                            DeflatedExplicitVRLittleEndian})
_NATIVE = _LITTLE_NATIVE | {ExplicitVRBigEndian}
# Compressed syntaxes that are lossless by definition (JPEG 2000 "Image Compression" and
# JPEG-LS "Near-Lossless" may be lossy, so they are not here).
_LOSSLESS = frozenset({RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                       JPEG2000Lossless, JPEG2000MCLossless, HTJ2KLossless,
                       HTJ2KLosslessRPCL})


@dataclass(frozen=True)
class Verdict:
    same: bool
    reason: str  # "same", "attributes", "pixels", "lossy", "too large", "unreadable"
    stored_syntax: str = ""
    received_syntax: str = ""


def same_instance(stored: bytes, received: bytes, *, max_bytes: int = MAX_BYTES,
                  max_pixel_bytes: int = MAX_PIXEL_BYTES) -> Verdict:
    """Whether two Part 10 streams hold the same dataset (see the module docstring)."""
    if len(stored) > max_bytes or len(received) > max_bytes:
        return Verdict(False, "too large")
    try:
        a = dicom_parse.read(stored)
        b = dicom_parse.read(received)
        ts_a, ts_b = _syntax(a), _syntax(b)
        reason = _compare(a, b, ts_a, ts_b, max_pixel_bytes)
    except (MemoryError, RecursionError):
        return Verdict(False, "too large")
    except Exception:  # pydicom and the decoders raise a wide range on odd input
        return Verdict(False, "unreadable")
    return Verdict(reason is None, reason or "same", ts_a, ts_b)


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", "") or "")


def _compare(a: Dataset, b: Dataset, ts_a: str, ts_b: str,
             max_pixel_bytes: int) -> str | None:
    if not _datasets_equal(a, b, top=True):
        return "attributes"
    return _pixels(a, b, ts_a, ts_b, max_pixel_bytes)


def _compared(tag: int) -> bool:
    """Elements whose presence or value only the encoding decides are left out."""
    return (tag & 0xFFFF) != 0 and (tag >> 16) != 0x0002 and tag != _TRAILING_PADDING


def _datasets_equal(a: Dataset, b: Dataset, *, top: bool) -> bool:
    # (iterating a Dataset yields its elements, decoded: the tags are what is compared here)
    tags_a = {int(t) for t in a.keys() if _compared(int(t))}  # noqa: SIM118
    tags_b = {int(t) for t in b.keys() if _compared(int(t))}  # noqa: SIM118
    if tags_a != tags_b:
        return False
    for tag in sorted(tags_a):
        if top and tag == _PIXEL_DATA:
            continue  # compared by ``_pixels``, after every attribute it depends on
        if not _elements_equal(a[tag], b[tag]):
            return False
    return True


def _elements_equal(ea: DataElement, eb: DataElement) -> bool:
    if ea.VR != eb.VR and "UN" in (ea.VR, eb.VR):
        return _encoded(ea) == _encoded(eb)
    if ea.VR == "SQ" or eb.VR == "SQ":
        if ea.VR != eb.VR or len(ea.value) != len(eb.value):
            return False
        return all(_datasets_equal(x, y, top=False)
                   for x, y in zip(ea.value, eb.value, strict=True))
    va: Any = ea.value
    vb: Any = eb.value
    if isinstance(va, bytes) and isinstance(vb, bytes):
        return _unpadded(va) == _unpadded(vb)
    return bool(va == vb)


def _unpadded(value: bytes) -> bytes:
    """Binary values are padded to an even length by some writers and not by others."""
    return value[:-1] if len(value) % 2 == 0 and value.endswith(b"\0") else value


def _encoded(elem: DataElement) -> bytes:
    """The element as Implicit VR Little Endian bytes (what a UN value holds)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_data_element(fp, elem)
    return bytes(fp.getvalue())


def _pixels(a: Dataset, b: Dataset, ts_a: str, ts_b: str,
            max_pixel_bytes: int) -> str | None:
    if (_PIXEL_DATA in a) != (_PIXEL_DATA in b):
        return "attributes"
    if _PIXEL_DATA not in a:
        return None
    raw_a, raw_b = a[_PIXEL_DATA].value, b[_PIXEL_DATA].value
    byte_equal = isinstance(raw_a, bytes) and isinstance(raw_b, bytes) and raw_a == raw_b
    if byte_equal and (ts_a == ts_b or {ts_a, ts_b} <= _LITTLE_NATIVE):
        return None
    for ts in (ts_a, ts_b):
        if ts not in _NATIVE and ts not in _LOSSLESS:
            return "lossy"  # or unknown: never "the same" once decoded
    if _decoded_size(a) > max_pixel_bytes:
        return "too large"
    pa = pixel_array(a, raw=True)
    pb = pixel_array(b, raw=True)
    # (a big endian source decodes to a big endian array: same values, other byte order)
    if pa.shape != pb.shape or (pa.dtype.kind, pa.dtype.itemsize) != \
            (pb.dtype.kind, pb.dtype.itemsize) or not np.array_equal(pa, pb):
        return "pixels"
    return None


def _decoded_size(ds: Dataset) -> int:
    """What ``pixel_array`` will allocate, from attributes already found equal."""
    frames = int(str(ds.get("NumberOfFrames", 1) or 1))
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    allocated = int(ds.get("BitsAllocated", 8) or 8)
    return max(frames, 1) * rows * columns * samples * max((allocated + 7) // 8, 1)
