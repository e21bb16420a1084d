"""C-FIND answers encoded straight from the index's DICOM JSON.

pynetdicom's C-FIND SCP encodes each pending answer with ``pynetdicom.dsutils.encode``
(pydicom's ``write_dataset``). For an answer of plain attributes (text, person names,
integers) building a pydicom dataset and writing it costs far more than the query itself,
so an ``Answer`` carries its DICOM JSON and is encoded here, in the little endian transfer
syntaxes, byte for byte as pydicom would (a test compares the two). Any attribute that is
not plain (sequences, binary, decimal strings...) is written by pydicom itself, element by
element; a big endian or deflated context gets the whole pydicom path.

``install`` wraps the ``encode`` that pynetdicom's service classes call: anything that is
not an ``Answer`` goes to pynetdicom's own function unchanged.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from pacsvault.dicom import patches
from pacsvault.dicomfile.dicomjson import json_to_dataset

log = logging.getLogger("pacsvault.dicom")

_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
_CHARSET_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                       "UT", "UV"})
_INT_VRS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}
# VRs whose empty value is written here (the set built once, not per element: issue 17)
_EMPTY_OK = _ASCII_VRS | _CHARSET_VRS | {"PN", "IS"} | set(_INT_VRS)
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_CODECS = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1", "ISO_IR 6": "ascii"}
_MAX_SHORT = 0xFFFF


class Answer(Dataset):
    """A C-FIND identifier known by its DICOM JSON; a real dataset only on demand."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__()
        self.__dict__["pv_json"] = answer

    def materialise(self) -> Dataset:
        return json_to_dataset(self.__dict__["pv_json"])


def _text(value: str, codec: str) -> bytes | None:
    try:
        return value.encode(codec)
    except UnicodeEncodeError:
        return None


def _value_bytes(vr: str, entry: dict[str, Any], codec: str) -> bytes | None:
    """The padded value of a plain element, or None when pydicom must write it."""
    values = entry.get("Value")
    if len(entry) == 1 or (len(entry) == 2 and values == []):
        return b"" if vr in _EMPTY_OK else None
    if len(entry) != 2 or not isinstance(values, list):
        return None
    if vr in _INT_VRS:
        if not all(type(v) is int for v in values):
            return None
        try:
            return b"".join(struct.pack(_INT_VRS[vr], v) for v in values)
        except struct.error:
            return None
    if vr == "IS":
        if not all(type(v) is int for v in values):
            return None
        raw = "\\".join(str(v) for v in values).encode("ascii")
    elif vr == "PN":
        names = []
        for v in values:
            if not isinstance(v, dict) or not all(
                    isinstance(v.get(k, ""), str) for k in _PN_GROUPS):
                return None
            names.append("=".join(v.get(k, "") for k in _PN_GROUPS).rstrip("="))
        encoded = _text("\\".join(names), codec)
        if encoded is None:
            return None
        raw = encoded
    elif vr in _ASCII_VRS or vr in _CHARSET_VRS:
        if not all(isinstance(v, str) for v in values):
            return None
        joined = "\\".join(values)
        if vr in _ASCII_VRS and not joined.isascii():
            return None
        encoded = _text(joined, "ascii" if vr in _ASCII_VRS else codec)
        if encoded is None:
            return None
        raw = encoded
    else:
        return None
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _header(tag: int, vr: str, length: int, implicit: bool) -> bytes | None:
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, elem, length)
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode("ascii"), 0, length)
    if length > _MAX_SHORT:
        return None
    return struct.pack("<HH2sH", group, elem, vr.encode("ascii"), length)


def encode_answer(answer: dict[str, Any], implicit: bool) -> bytes:
    """The little endian encoding of an answer, as pydicom's ``write_dataset`` writes it."""
    charset_entry = answer.get("00080005") or {}
    charset = (charset_entry.get("Value") or ["ISO_IR 6"])[0]
    codec = _CODECS.get(str(charset))
    out: list[bytes] = []
    for tag_hex in sorted(answer, key=lambda t: int(t, 16)):
        entry = answer[tag_hex]
        tag = int(tag_hex, 16)
        vr = entry.get("vr")
        value = _value_bytes(vr, entry, codec) if codec and isinstance(vr, str) else None
        header = _header(tag, vr, len(value), implicit) if value is not None else None
        if value is None or header is None:
            out.append(_pydicom_element(answer, tag_hex, implicit))
        else:
            out += (header, value)
    return b"".join(out)


def _pydicom_element(answer: dict[str, Any], tag_hex: str, implicit: bool) -> bytes:
    """One element written by pydicom, with the answer's character set."""
    single = {tag_hex: answer[tag_hex]}
    if "00080005" in answer:
        single["00080005"] = answer["00080005"]
    ds = json_to_dataset(single)
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = True
    write_data_element(fp, ds[int(tag_hex, 16)], ds._character_set)
    return fp.getvalue()


def install() -> None:
    """Let pynetdicom's service classes encode ``Answer``s here (idempotent; the wrapping
    itself is ``patches.wrap_service_encode``)."""
    patches.wrap_service_encode(_encode_hook)


def _encode_hook(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
                 deflated: bool) -> bytes | Dataset:
    """An ``Answer``'s bytes, or the dataset for pynetdicom's own ``encode``."""
    if isinstance(ds, Answer):
        if is_little_endian and not deflated:
            try:
                return encode_answer(ds.__dict__["pv_json"], is_implicit_vr)
            except Exception as exc:  # anything unforeseen: pydicom's own path
                log.warning("answer encoded by pydicom (%s)", type(exc).__name__)
        return ds.materialise()
    return ds
