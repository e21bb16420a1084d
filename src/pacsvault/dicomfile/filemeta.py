"""A Part 10 stream's File Meta Information walked without pydicom: which transfer syntax
it names and where the dataset starts.

Why: two hot paths need only that much — retrieval sends a stored object's dataset bytes
as they are (``dicom/retrieve.split``), and the receive path decides "deflated or not"
before parsing (``inflate.read``) — and pydicom's reading of the whole file meta cost
more than the rest of their work (issue 17). The walk answers only when the group is
plainly what Part 10 prescribes (preamble, ``DICM``, explicit VR little endian elements of
group 0002 with known VRs, a UI Transfer Syntax UID); anything else gets None, and the
caller takes pydicom's path.
"""

from __future__ import annotations

import struct

PREAMBLE = 128
MAX_META = 64 * 1024  # a File Meta Information group longer than this is not ours
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD",
                        b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM",
                        b"UI", b"UL", b"US"})
_TRANSFER_SYNTAX = 0x0010  # (0002,0010)


def walk(data: bytes | memoryview) -> tuple[str, int] | None:
    """(Transfer Syntax UID, offset just after the group 0002 elements), or None when the
    file meta is not plainly explicit VR little endian, is cut short, longer than
    ``MAX_META`` or names no transfer syntax."""
    start_of_meta = PREAMBLE + 4
    if len(data) < start_of_meta or bytes(data[PREAMBLE:start_of_meta]) != b"DICM":
        return None
    pos, end = start_of_meta, min(len(data), start_of_meta + MAX_META)
    syntax: str | None = None
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        else:
            return None  # not plainly explicit VR (pydicom may read it otherwise)
        if length == 0xFFFFFFFF or start + length > end:
            return None
        if element == _TRANSFER_SYNTAX:
            if vr != b"UI":
                return None
            try:
                syntax = bytes(data[start:start + length]).rstrip(b"\x00 ").decode("ascii")
            except UnicodeDecodeError:
                return None
        pos = start + length
    return (syntax, pos) if syntax else None
