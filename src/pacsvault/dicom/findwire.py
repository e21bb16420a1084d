"""C-FIND responses on the wire without pynetdicom's per-message machinery (issue 17).

Why: once the answers themselves were encoded from the index's JSON (``dicom/answers``),
what was left of a C-FIND's sending was pynetdicom's per-message path, paid for every
Pending answer and the final status: the C-FIND-RSP command set built as a pydicom
``Dataset`` and encoded (twice: once to learn the group length), one ``P_DATA``
primitive per fragment, each queued to the DUL thread, woken, turned into a state-machine
event and a ``P_DATA_TF`` PDU object, encoded and written with its own ``send``.

Here, for a C-FIND response without comment or offending element (every Pending answer,
the final Success, Cancel and plain failures):

- the command set is encoded directly (``encode_find_rsp``: byte for byte what
  pynetdicom's ``primitive_to_message`` + ``encode`` write, proved by a test);
- the PDUs are pynetdicom's exactly (``sendpath.fragments``: one PDV per PDU, the peer's
  maximum PDU length as negotiated, the same message control headers), so the bytes on
  the wire are the ones pynetdicom would write, only written differently;
- the Pending answers are held back in the association's own buffer and written together
  with the next message that is not a Pending (the final status: the end of the answers),
  or when ``HOLD_BYTES`` are held, or when the C-FIND handler is about to do slow work
  (``flush``, called by ``qr.on_find`` before it reads the next chunk of answers and
  writes that chunk's record): the usual C-FIND of a few matches leaves in one write
  and one wake-up of the DUL thread, instead of one per PDU. Nothing is reordered:
  anything else sent on the association first writes what is held.

What stays pynetdicom's: the DUL thread writes (``sendpath.WireDUL``: in Sta6/Sta8 only,
after any pending event, a write error is Evt17); everything this module does not vouch
for (an error comment, an offending element, a UID outside the plain form, bound
DIMSE-sent handlers, a PDU size pynetdicom refuses) goes through pynetdicom's own
``send_msg`` after whatever is held.

The audit rule is unchanged: the record naming a chunk's answers is durable before the
chunk is yielded (``qr.on_find``), so a held answer is only ever *later*, never earlier.
"""

from __future__ import annotations

import logging
import re
import struct
from typing import Any

from pynetdicom.dimse_primitives import C_FIND

from pacsvault.dicom import patches
from pacsvault.dicom.sendpath import Wire, fragments, sent_messages_watched, wire_dul

log = logging.getLogger("pacsvault.dicom")

# False: pynetdicom's send path only (tests compare both).
ENABLED = True
# Pending answers held per association at most before they are written (bytes on the wire).
HOLD_BYTES = 1 << 16
_PENDING = frozenset({0xFF00, 0xFF01})
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_FIND_RSP = 0x8020  # Command Field of a C-FIND-RSP
_HELD = "_pv_find_held"  # attribute of the association's DIMSE provider


def _ui(elem: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0, elem, len(value)) + value


def _us(elem: int, value: int) -> bytes:
    return _ELEMENT.pack(0, elem, 2) + _US.pack(value)


def encode_find_rsp(primitive: Any) -> bytes | None:
    """The command set (implicit VR little endian) of a C-FIND response as pynetdicom
    writes it, or None when the response is one this module leaves to pynetdicom (a
    request, an error comment, an offending element, an unusual UID or value)."""
    if type(primitive) is not C_FIND:
        return None
    msg_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    if msg_id is None or status is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if not (0 <= int(msg_id) <= 0xFFFF and 0 <= int(status) <= 0xFFFF):
        return None
    parts = []
    sop_class = primitive.AffectedSOPClassUID
    if sop_class is not None:
        uid = str(sop_class)
        if not (len(uid) <= 64 and _UID.fullmatch(uid)):
            return None
        parts.append(_ui(0x0002, uid))
    # pynetdicom: Command Data Set Type 0x0001 whenever an Identifier is set, else 0x0101
    data_set_type = 0x0001 if primitive.Identifier is not None else 0x0101
    parts += [_us(0x0100, _FIND_RSP), _us(0x0120, int(msg_id)), _us(0x0800, data_set_type),
              _us(0x0900, int(status))]
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body


class _Held:
    """The PDUs of Pending answers not yet handed to the DUL (one association's)."""

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes | memoryview] = []
        self.size = 0


def flush(dimse: Any) -> None:
    """Hand what is held for this association's DIMSE provider to its DUL, as one write.
    Called before any other message is sent, and by the C-FIND handler before slow work."""
    held: _Held | None = getattr(dimse, _HELD, None)
    if held is None or not held.pieces:
        return
    pieces, size = held.pieces, held.size
    held.pieces, held.size = [], 0
    dimse.dul.send_pdu(Wire(pieces, size))


def send_msg(dimse: Any, primitive: Any, context_id: int) -> bool:
    """``DIMSEServiceProvider.send_msg`` for a C-FIND response ``encode_find_rsp`` takes
    (True: held or handed to the DUL); False: pynetdicom's path, after what is held."""
    if not ENABLED or type(primitive) is not C_FIND:
        flush(dimse)
        return False
    command = _command(dimse.assoc, primitive)
    identifier = primitive.Identifier
    data = identifier.getvalue() if identifier is not None else b""
    cut = None
    if command is not None and (identifier is None or data):
        cut = fragments(context_id, command, data, int(dimse.maximum_pdu_size))
    if cut is None or not wire_dul(dimse.dul):
        flush(dimse)
        return False
    held: _Held | None = getattr(dimse, _HELD, None)
    if held is None:
        held = _Held()
        setattr(dimse, _HELD, held)
    pieces, size = cut
    held.pieces += pieces
    held.size += size
    if primitive.Status not in _PENDING or held.size >= HOLD_BYTES:
        flush(dimse)
    return True


def _command(assoc: Any, primitive: Any) -> bytes | None:
    if sent_messages_watched(assoc):
        return None
    try:
        return encode_find_rsp(primitive)
    except (TypeError, ValueError, struct.error):
        return None


def install() -> None:
    """Route ``DIMSEServiceProvider.send_msg`` through ``send_msg`` first (idempotent;
    the wrapping itself is ``patches.wrap_send_msg``)."""
    patches.wrap_send_msg(send_msg, first=True)


__all__ = ["ENABLED", "HOLD_BYTES", "encode_find_rsp", "flush", "install", "send_msg"]
