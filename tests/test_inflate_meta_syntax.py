"""``inflate.read`` decides "deflated or not" from the file meta it walks itself
(``_meta_syntax``, issue 17: pydicom read the file meta twice per received image). The
inflation bound depends on that decision: a stream ``_meta_syntax`` called "not deflated"
goes to ``dcmread``, which would inflate without any limit. So the walk must never name
another syntax than the one pydicom reads; when in doubt it says None and the stream takes
the bounded path as before.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from pacsvault.dicomfile import inflate


def _pydicom_syntax(raw: bytes) -> str | None:
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    value = _read_file_meta_info(fp).get("TransferSyntaxUID")
    return None if value is None else str(value)


def test_the_walk_names_what_pydicom_reads_or_nothing() -> None:
    paths = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))
    named = 0
    for path in paths:
        raw = path.read_bytes()
        try:
            reference = _pydicom_syntax(raw)
        except Exception:
            reference = None
        found = inflate._meta_syntax(raw)
        assert found is None or found == reference, path.name
        named += found is not None
    assert named > 50  # the usual file takes the direct path


def _meta_bytes(syntax: str, *, implicit: bool) -> bytes:
    """A file meta group with ``syntax``, explicit VR (as Part 10 requires) or, as some
    writers get wrong, implicit VR."""
    elements = [(0x0001, b"OB", b"\x00\x01"), (0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7\x00"),
                (0x0003, b"UI", (generate_uid() + "\x00")[:64].encode()),
                (0x0010, b"UI", (syntax + "\x00" * (len(syntax) % 2)).encode())]
    out = b""
    for element, vr, value in elements:
        if implicit:
            out += struct.pack("<HHI", 2, element, len(value)) + value
        elif vr == b"OB":
            out += struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
        else:
            out += struct.pack("<HH2sH", 2, element, vr, len(value)) + value
    return out


@pytest.mark.parametrize("implicit", [False, True])
def test_a_deflated_bomb_stays_bounded_whatever_its_file_meta(implicit: bool) -> None:
    # explicit VR little endian: PatientID, then 6 MiB of zero pixel data
    dataset_bytes = (struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 4) + b"BOMB"
                     + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 6 * 1024 * 1024)
                     + bytes(6 * 1024 * 1024))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zipped = deflater.compress(dataset_bytes) + deflater.flush()
    raw = (b"\x00" * 128 + b"DICM" + _meta_bytes(DeflatedExplicitVRLittleEndian,
                                                  implicit=implicit) + zipped)
    assert inflate._meta_syntax(raw) in (None, DeflatedExplicitVRLittleEndian)
    with pytest.raises(inflate.InflateLimitExceeded):
        inflate.read(raw, limit=1024 * 1024)


def test_an_explicit_meta_is_read_once_and_the_same() -> None:
    meta = _meta_bytes(ExplicitVRLittleEndian, implicit=False)
    assert inflate._meta_syntax(b"\x00" * 128 + b"DICM" + meta) == ExplicitVRLittleEndian
    # cut short, or no "DICM": no answer (pydicom's own reading decides)
    assert inflate._meta_syntax(b"\x00" * 128 + b"DICM" + meta[:-4]) is None
    assert inflate._meta_syntax(b"\x00" * 128 + b"XXXX" + meta) is None
