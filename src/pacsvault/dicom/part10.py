"""The received C-STORE dataset as a Part 10 stream, without pydicom.

Split from ``dicom/server`` (issue 15). ``Archive.store`` takes a Part 10 stream; building
its header with pydicom datasets cost more per image than the rest of the receive path, so
the file meta is written here byte for byte as pynetdicom's ``encode_file_meta`` writes it
(proved by ``tests/test_dicom_fastpath.py``; registered in ``dicom/patches``).
"""

from __future__ import annotations

import io
import struct

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"UN", b"OW", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The preamble, prefix and group 0002 exactly as pynetdicom's ``encode_file_meta``
    writes them (proved by a test), without building pydicom datasets per image."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _ui(sop_class)),
        _element(0x00020003, b"UI", _ui(sop_instance)),
        _element(0x00020010, b"UI", _ui(transfer_syntax)),
        _element(0x00020012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _element(0x00020013, b"SH", version),
    ))
    length = _element(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + length + body


def part10(event: evt.Event) -> bytes:
    """The received C-STORE dataset as a Part 10 stream (``encoded_dataset(True)``)."""
    request = event.request
    assert isinstance(request, C_STORE)
    uids = (str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax or ""))
    data = request.DataSet
    if not isinstance(data, io.BytesIO) or not all(
            0 < len(u) <= 64 and u.isascii() and "\x00" not in u for u in uids):
        return bytes(event.encoded_dataset(include_meta=True))
    view = data.getbuffer()
    try:
        return b"".join((file_meta(*uids), view))
    finally:
        view.release()
