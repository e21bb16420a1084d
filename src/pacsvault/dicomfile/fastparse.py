"""A received object's header decoded straight from its bytes, for the plain common case.

Why: parsing with pydicom (``dcmread``, then converting every element and building DICOM
JSON from the converted values) was about half of ``Archive.store``'s CPU for a small
image (issue 17: ~2 ms of the ~3.7 ms a 64x64 MR cost, where Orthanc spends ~1.5 ms on
everything). This walk builds the same DICOM JSON entries (``parse.header_json``) and the
same top-level values ``describe`` reads, from the value bytes, in one pass.

It answers only when the stream is plainly what it understands, and then exactly as
pydicom would (``tests/test_fastparse.py`` runs both paths over pydicom's test files, the
bench images, the fixtures, implicit VR copies of them and hostile cuts and edits): Part
10 file meta that ``filemeta.walk`` reads, a little endian transfer syntax that is not
deflated, no character set or ISO_IR 100 / ISO_IR 192 without escape sequences, tags
strictly ascending at every level (so no duplicate, the JSON order is the file's), every
length inside the stream and every value well formed for its VR (numbers of a whole
number of values, IS/DS plain decimal numbers), sequences and items whose lengths and
delimiters agree exactly, encapsulated Pixel Data whose items end on a sequence
delimiter. Explicit VR: known VRs other than UN (which pydicom replaces). Implicit VR:
the VR pydicom looks up (public dictionary, a private creator's dictionary, else UN),
with Pixel Data and the US-or-SS attributes of the top level corrected as pydicom does,
other ambiguous VRs declined. Anything else — odd, truncated, hostile or just unusual —
returns None and the caller takes pydicom's path, which then gives the usual answer or
error: this module never decides that an object is bad.
"""

from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom.datadict import _dictionary_vr_fast, private_dictionary_VR
from pydicom.filewriter import _AMBIGUOUS_US_SS_TAGS
from pydicom.tag import _LUT_DESCRIPTOR_TAGS
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)

from pacsvault.dicomfile import filemeta

BULK_MARKER = "pacsvault:bulk"
_INLINE_MAX = (1024 // 4) * 3  # parse._BULK_THRESHOLD: base64 above 1024 characters
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_CHARSET = 0x00080005
_ENCODINGS = {"ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_IS = re.compile(r" *[+-]?[0-9]{1,15} *", re.ASCII)
_DS = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *", re.ASCII)

# VR -> (32-bit length, kind)
_VRS: dict[bytes, tuple[bool, str]] = {
    **{vr: (False, "string") for vr in (b"AS", b"CS", b"DA", b"DT", b"TM")},
    b"AE": (False, "ae"), b"UI": (False, "ui"), b"UR": (True, "ur"),
    **{vr: (False, "text") for vr in (b"SH", b"LO")}, b"UC": (True, "text"),
    **{vr: (False, "single") for vr in (b"LT", b"ST")}, b"UT": (True, "single"),
    b"PN": (False, "pn"), b"IS": (False, "is"), b"DS": (False, "ds"), b"AT": (False, "at"),
    **{vr: (False, "number") for vr in (b"US", b"SS", b"UL", b"SL", b"FL", b"FD")},
    **{vr: (True, "number") for vr in (b"UV", b"SV")},
    **{vr: (True, "binary") for vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW")},
    b"SQ": (True, "sq"),
}
_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q",
            "SV": "q"}
_SIZES = {vr: struct.calcsize("<" + f) for vr, f in _NUMBERS.items()}
# implicit VR: the VR looked up; UN (unknown or private without a dictionary entry) is
# binary there, while an explicit UN is left to pydicom (it replaces it with a known VR)
_KINDS = {code.decode("ascii"): kind for code, (_, kind) in _VRS.items()} | {"UN": "binary"}
_PIXEL_REPRESENTATION = 0x00280103


class _Unplain(Exception):
    """Not the plain case: the caller reads the stream with pydicom."""


@dataclass(frozen=True)
class Header:
    """What ``parse.describe`` needs of a stream, decoded without pydicom: the transfer
    syntax, the DICOM JSON of every element (``parse.header_json``'s dict, in file order)
    and pydicom's value of each top-level element of ``wanted`` (str, int, None)."""

    syntax: str
    meta: dict[str, Any]
    values: dict[int, Any]


def _implicit(syntax: str) -> bool | None:
    """How pydicom's ``read_partial`` reads the dataset: implicit VR little endian (True),
    explicit VR little endian (False), otherwise (None: not here)."""
    if _UID.fullmatch(syntax) is None or syntax in PrivateTransferSyntaxes:
        return None
    if syntax == ImplicitVRLittleEndian:
        return True
    if syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        return None
    return False


@lru_cache(maxsize=4096)
def _public_vr(tag: int) -> str | None:
    try:
        return str(_dictionary_vr_fast(tag))
    except KeyError:
        return None


@lru_cache(maxsize=1024)
def _private_vr(tag: int, creator: str) -> str:
    try:
        return str(private_dictionary_VR(tag, creator))
    except KeyError:
        return "UN"


def walk(raw: bytes, wanted: dict[int, str]) -> Header | None:
    """The stream's ``Header``, or None when it is not plainly readable here. ``wanted``:
    the top-level tags whose values are kept, each with the one VR it is read with."""
    found = filemeta.walk(raw)
    implicit = None if found is None else _implicit(found[0])
    if found is None or implicit is None or found[1] >= len(raw):
        return None
    values: dict[int, Any] = {}
    try:
        meta, _ = _Reader(raw, wanted, values, implicit).dataset(
            found[1], len(raw), len(raw), "latin_1", top=True)
    except (_Unplain, UnicodeDecodeError, ValueError, struct.error):
        return None
    return Header(found[0], meta, values)


class _Reader:
    def __init__(self, raw: bytes, wanted: dict[int, str], values: dict[int, Any],
                 implicit: bool) -> None:
        self.raw = raw
        self.view = memoryview(raw)
        self.wanted = wanted
        self.values = values
        self.implicit = implicit
        self.text_seen = False  # a value decoded with the character set already
        self.pixel_representation: int | None = None

    def implicit_vr(self, tag: int, length: int, start: int, limit: int,
                    creators: dict[int, str], top: bool) -> str:
        """The VR pydicom gives an implicit VR element: the generator's look-up for an
        undefined length (a sequence if items follow), else ``hooks.raw_element_vr``
        (dictionary; private: the creator's dictionary, else UN; group length UL), then
        ``correct_ambiguous_vr_element`` for Pixel Data and the US-or-SS attributes."""
        vr = _public_vr(tag)
        if length == _UNDEFINED and vr is None:
            if start + 4 > limit or struct.unpack_from("<L", self.raw, start)[0] != 0xE000FFFE:
                raise _Unplain
            return "SQ"
        if vr is None:
            group, element = tag >> 16, tag & 0xFFFF
            if not group & 1:
                return "UL" if element == 0 else "UN"
            if 0x10 <= element <= 0xFF:
                return "LO"
            block = group << 16 | element >> 8
            if not element & 0xFF00 or block not in creators:
                return "UN"
            return _private_vr(tag, creators[block])
        if vr == "OB or OW" and tag == _PIXEL_DATA:
            return "OB" if length == _UNDEFINED else "OW"
        if vr == "US or SS":
            if not top or tag not in _AMBIGUOUS_US_SS_TAGS or tag in _LUT_DESCRIPTOR_TAGS \
                    or self.pixel_representation is None:
                raise _Unplain
            return "US" if self.pixel_representation == 0 else "SS"
        return vr

    def dataset(self, pos: int, end: int | None, limit: int, encoding: str, *,
                top: bool = False) -> tuple[dict[str, Any], int]:
        """Elements from ``pos`` to ``end`` exactly, or (``end`` None: an item of undefined
        length) to its item delimiter, none past ``limit``; (DICOM JSON, position after)."""
        raw = self.raw
        out: dict[str, Any] = {}
        creators: dict[int, str] = {}  # private blocks of this dataset
        last = -1
        if top and self.implicit and pos + 6 <= limit \
                and 0x40 < raw[pos + 4] < 0x5B and 0x40 < raw[pos + 5] < 0x5B:
            raise _Unplain  # pydicom would read it as explicit VR, with a warning
        while end is None or pos < end:
            if pos + 8 > limit:
                raise _Unplain
            group, element = struct.unpack_from("<HH", raw, pos)
            tag = group << 16 | element
            if end is None and tag == _ITEM_END:
                if raw[pos + 4:pos + 8] != b"\0\0\0\0":
                    raise _Unplain
                return out, pos + 8
            if tag <= last or group in (0x0000, 0x0002, 0xFFFE):
                raise _Unplain
            last = tag
            if self.implicit:
                (length,) = struct.unpack_from("<L", raw, pos + 4)
                start = pos + 8
                vr = self.implicit_vr(tag, length, start, limit, creators, top)
                found_kind = _KINDS.get(vr)
                if found_kind is None:
                    raise _Unplain  # another ambiguous VR
                kind = found_kind
            else:
                code = raw[pos + 4:pos + 6]
                kind_of = _VRS.get(code)
                if kind_of is None:
                    raise _Unplain
                vr = code.decode("ascii")
                if kind_of[0]:
                    if pos + 12 > limit:
                        raise _Unplain
                    (length,) = struct.unpack_from("<L", raw, pos + 8)
                    start = pos + 12
                else:
                    (length,) = struct.unpack_from("<H", raw, pos + 6)
                    start = pos + 8
                kind = kind_of[1]
            if tag in _LUT_DESCRIPTOR_TAGS and vr != "US":
                raise _Unplain  # pydicom's hook adds 65536 to a negative first value
            value: Any = None
            if length == _UNDEFINED:
                if kind == "sq":
                    entry, pos = self.sequence(start, None, limit, encoding)
                elif tag == _PIXEL_DATA and vr in ("OB", "OW"):
                    size, pos = self.encapsulated(start, limit)
                    entry = _binary(vr, self.view[start:start + size])
                else:
                    raise _Unplain
            else:
                pos = start + length
                if pos > limit:
                    raise _Unplain
                if kind == "sq":
                    entry, _ = self.sequence(start, pos, pos, encoding)
                elif kind == "binary":
                    entry = _binary(vr, self.view[start:pos])
                else:
                    data = raw[start:pos]
                    if tag == _CHARSET:
                        if not top or self.text_seen:
                            raise _Unplain
                        name = data.decode("latin_1").rstrip(" \x00")
                        if name not in _ENCODINGS:
                            raise _Unplain
                        encoding = _ENCODINGS[name]
                    if kind in ("text", "single", "pn"):
                        self.text_seen = True
                    entry, value = _element(kind, vr, data, encoding)
                    if tag & 0x10000 and 0x10 <= tag & 0xFFFF <= 0xFF:  # private creator
                        if not isinstance(value, str):
                            raise _Unplain
                        creators[tag] = value
                    if top and tag == _PIXEL_REPRESENTATION:
                        if not isinstance(value, int):
                            raise _Unplain
                        self.pixel_representation = value
            if top and tag in self.wanted:
                if self.wanted[tag] != vr or isinstance(value, list):
                    raise _Unplain  # not how ``describe`` reads it: pydicom's path
                self.values[tag] = value
            out[f"{tag:08X}"] = entry
        if pos != end:
            raise _Unplain
        return out, pos

    def sequence(self, pos: int, end: int | None, limit: int,
                 encoding: str) -> tuple[dict[str, Any], int]:
        """A sequence's items, of defined length (ending exactly at ``end``) or not."""
        raw = self.raw
        items: list[dict[str, Any]] = []
        while end is None or pos < end:
            if pos + 8 > limit:
                raise _Unplain
            group, element, length = struct.unpack_from("<HHL", raw, pos)
            tag = group << 16 | element
            if end is None and tag == _SEQUENCE_END:
                if length != 0:
                    raise _Unplain
                return {"vr": "SQ", "Value": items}, pos + 8
            if tag != _ITEM:
                raise _Unplain
            start = pos + 8
            if length == _UNDEFINED:
                item, pos = self.dataset(start, None, limit, encoding)
            else:
                if start + length > limit:
                    raise _Unplain
                item, pos = self.dataset(start, start + length, start + length, encoding)
            items.append(item)
        if pos != end:
            raise _Unplain
        return {"vr": "SQ", "Value": items}, pos

    def encapsulated(self, pos: int, limit: int) -> tuple[int, int]:
        """Encapsulated Pixel Data walked item by item as pydicom does
        (``_try_read_encapsulated_pixel_data``): (value size, position after the
        sequence delimiter)."""
        raw = self.raw
        start = pos
        while True:
            if pos + 8 > limit:
                raise _Unplain
            group, element, length = struct.unpack_from("<HHL", raw, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                if length != 0:
                    raise _Unplain
                return pos - start, pos + 8
            if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > limit:
                raise _Unplain
            pos += 8 + length


def _binary(vr: str, data: memoryview) -> dict[str, Any]:
    """``parse._fast_entry`` for a binary value (the bytes copied only when inlined)."""
    if not len(data):
        return {"vr": vr}
    if len(data) > _INLINE_MAX:
        return {"vr": vr, "BulkDataURI": BULK_MARKER}
    return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("utf-8")}


def _entry(vr: str, values: list[Any]) -> tuple[dict[str, Any], Any]:
    """(DICOM JSON entry, pydicom's value: one value as itself, several as a list)."""
    if len(values) == 1:
        return {"vr": vr, "Value": values}, values[0]
    return {"vr": vr, "Value": values}, values


def _decoded(data: bytes, encoding: str) -> str:
    if b"\x1b" in data:  # escape sequences: pydicom's code extension handling
        raise _Unplain
    return data.decode(encoding)  # strict: pydicom would replace, with a warning


def _element(kind: str, vr: str, data: bytes, encoding: str) -> tuple[dict[str, Any], Any]:
    """One element of defined length: (JSON entry as ``parse.header_json`` makes it, the
    value as ``describe`` would read it from the converted element)."""
    if not data:
        return {"vr": vr}, ("" if kind not in ("number", "at") else None)
    if kind == "string":  # values.convert_string / multi_string
        parts = data.decode("latin_1").rstrip(" \x00").split("\\")
    elif kind == "ui":  # convert_UI, then UID() strips each value
        parts = [p.strip() for p in data.decode("latin_1").rstrip("\x00 ").split("\\")]
    elif kind == "ae":  # convert_AE_string
        parts = [s.strip() for s in data.decode("latin_1").split("\\")]
    elif kind == "ur":  # convert_UR_string
        parts = [data.decode("latin_1").rstrip()]
    elif kind == "text":  # convert_text
        parts = [v.rstrip("\x00 ") for v in _decoded(data, encoding).split("\\")]
    elif kind == "single":  # convert_single_string
        parts = [_decoded(data, encoding).rstrip("\x00 ")]
    elif kind == "pn":
        return _person_names(data, encoding)
    elif kind == "is":  # convert_IS_string, IS, then convert_to_python_number
        parts = data.decode("latin_1").rstrip(" \x00").split("\\")
        if parts == [""]:  # (other blanks: pydicom keeps the text, JSON drops it)
            return {"vr": vr}, ""
        if not all(_IS.fullmatch(p) for p in parts):
            raise _Unplain
        return _entry(vr, [int(p) for p in parts])
    elif kind == "ds":  # convert_DS_string, DSfloat, then convert_to_python_number
        parts = data.decode("latin_1").strip().rstrip(" \x00").split("\\")
        if parts == [""]:
            return {"vr": vr}, ""
        if not all(_DS.fullmatch(p) for p in parts):
            raise _Unplain
        return _entry(vr, [float(p) for p in parts])
    elif kind == "number":  # convert_numbers
        size = _SIZES[vr]
        if len(data) % size:
            raise _Unplain
        numbers = list(struct.unpack(f"<{len(data) // size}{_NUMBERS[vr]}", data))
        if vr in ("FL", "FD"):
            return _entry(vr, [float(v) for v in numbers])
        return _entry(vr, numbers)
    elif kind == "at":  # convert_ATvalue, then format(tag, "08X")
        if len(data) % 4:
            raise _Unplain
        pairs = struct.unpack(f"<{len(data) // 2}H", data)
        tags = [f"{pairs[i] << 16 | pairs[i + 1]:08X}" for i in range(0, len(pairs), 2)]
        return {"vr": vr, "Value": tags}, None
    else:
        raise _Unplain
    if len(parts) == 1 and not parts[0]:
        return {"vr": vr}, ""
    return _entry(vr, parts)


def _person_names(data: bytes, encoding: str) -> tuple[dict[str, Any], Any]:
    """``convert_PN`` then ``DataElement.to_json_dict``: each name's components (split on
    ``=``, empty ones dropped at the end) as Alphabetic, Ideographic, Phonetic."""
    names = _decoded(data.rstrip(b"\x00 "), encoding).split("\\")
    if len(names) == 1 and not names[0]:
        return {"vr": "PN"}, ""
    values: list[dict[str, str]] = []
    texts: list[str] = []
    for name in names:
        components = name.split("=")
        while components and not components[-1]:
            components.pop()
        if not components:
            raise _Unplain  # pydicom fails on it (the element is left out)
        entry = {"Alphabetic": components[0]}
        if len(components) > 1:
            entry["Ideographic"] = components[1]
        if len(components) > 2:
            entry["Phonetic"] = components[2]
        values.append(entry)
        texts.append("=".join(components))
    return {"vr": "PN", "Value": values}, texts[0] if len(texts) == 1 else texts
