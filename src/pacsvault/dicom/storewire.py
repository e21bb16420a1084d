"""The C-STORE receive path on the wire, inside an association pynetdicom established.

Why (issue 17): at the PDU sizes modalities use, pynetdicom's per-PDU machinery (a PDU
object and a PDV object per fragment, a state-machine event per PDU, ``BytesIO`` appends,
the command set decoded into a pydicom ``Dataset``, the response built as a ``Dataset``
and encoded again) cost as much CPU per image as a quarter of pacsvault's own work
(profile in ``bench/RESULTS.md``). Here, in the DUL thread, the P-DATA-TF PDUs of a
C-STORE request go straight into one command buffer and one dataset buffer (PDV headers
read in place from the PDU, no per-PDV objects), and the reactor thread answers with a
C-STORE-RSP encoded directly.

What stays pynetdicom's: association negotiation, release and abort, every other DIMSE
service, every PDU in a state other than Sta6, and any C-STORE request this module does
not recognise as plainly well-formed (its command is handed over, unchanged, so such a
request is treated exactly as before). A PDV whose length does not fit its PDU, a command
fragment inside a dataset, or a fragment on another presentation context is a protocol
error: the caller aborts (A-ABORT) and nothing is stored. Only a complete message reaches
the store handler; an abort or a closed connection drops the buffers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

from pacsvault.dicom.part10 import file_meta

# (0000,xxxx) command elements this path reads (PS3.7 9.3.1.1, C-STORE-RQ)
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031
_GROUP_LENGTH = 0x0000
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_KNOWN = frozenset({_GROUP_LENGTH, _AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID,
                    _PRIORITY, _DATA_SET_TYPE, _AFFECTED_SOP_INSTANCE,
                    _MOVE_ORIGINATOR_AE, _MOVE_ORIGINATOR_ID})
_US = frozenset({_COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _MOVE_ORIGINATOR_ID})
# A UID as PS3.5 9.1 writes it; anything else is left to pynetdicom's own handling.
_UID = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ELEMENT = struct.Struct("<HHI")
_PDV = struct.Struct(">LBB")  # item length, context ID, message control header


class ProtocolError(Exception):
    """A P-DATA-TF PDU this association must be aborted for (PS3.8 9.3.5)."""


@dataclass(frozen=True, slots=True)
class StoreCommand:
    """A C-STORE-RQ command set, read without pydicom."""

    message_id: int
    sop_class: str
    sop_instance: str
    priority: int


def _uid(value: bytes) -> str | None:
    if value.endswith(b"\x00"):
        value = value[:-1]
    if not 0 < len(value) <= 64 or _UID.fullmatch(value) is None:
        return None
    return value.decode("ascii")


def parse_command(data: bytes | bytearray | memoryview) -> StoreCommand | None:
    """The C-STORE-RQ this command set is, or None (another command, or anything unusual:
    then pynetdicom decodes it as it always did)."""
    raw = bytes(data)
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 8 > end:
            return None
        group, elem, length = _ELEMENT.unpack_from(raw, offset)
        offset += 8
        if group != 0 or elem not in _KNOWN or elem in values or offset + length > end:
            return None
        values[elem] = raw[offset:offset + length]
        offset += length
    us: dict[int, int] = {}
    for elem in _US & values.keys():
        if len(values[elem]) != 2:
            return None
        us[elem] = int.from_bytes(values[elem], "little")
    length = values.get(_GROUP_LENGTH)
    if length is None or len(length) != 4 or int.from_bytes(length, "little") != end - 12:
        return None
    if (us.get(_COMMAND_FIELD) != _C_STORE_RQ or _MESSAGE_ID not in us
            or us.get(_PRIORITY) not in (0, 1, 2)
            or us.get(_DATA_SET_TYPE, _NO_DATA_SET) == _NO_DATA_SET):
        return None
    if _MOVE_ORIGINATOR_AE in values or _MOVE_ORIGINATOR_ID in values:
        return None  # a C-MOVE sub-operation: rare, pynetdicom's path keeps its fields
    sop_class = _uid(values.get(_AFFECTED_SOP_CLASS, b""))
    sop_instance = _uid(values.get(_AFFECTED_SOP_INSTANCE, b""))
    if sop_class is None or sop_instance is None:
        return None
    return StoreCommand(us[_MESSAGE_ID], sop_class, sop_instance, us[_PRIORITY])


def _ui_element(elem: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0, elem, len(value)) + value


def _us_element(elem: int, value: int) -> bytes:
    return _ELEMENT.pack(0, elem, 2) + struct.pack("<H", value)


def encode_store_rsp(message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """The C-STORE-RSP command set (implicit VR little endian) exactly as pynetdicom encodes
    it for a status without comment (proved by a test)."""
    body = b"".join((
        _ui_element(_AFFECTED_SOP_CLASS, sop_class),
        _us_element(_COMMAND_FIELD, _C_STORE_RSP),
        _us_element(0x0120, message_id),  # MessageIDBeingRespondedTo
        _us_element(_DATA_SET_TYPE, _NO_DATA_SET),
        _us_element(0x0900, status),
        _ui_element(_AFFECTED_SOP_INSTANCE, sop_instance),
    ))
    return _ELEMENT.pack(0, _GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


@dataclass(slots=True)
class FastStore:
    """A complete C-STORE request: its command and its Part 10 stream (file meta as
    ``dicom/part10`` writes it, then the dataset bytes as received)."""

    context_id: int
    command: StoreCommand
    part10: list[bytes | memoryview] = field(repr=False)  # its pieces, in order


@dataclass(slots=True)
class _Message:
    """A request being received: the file meta, then each dataset fragment as a view of
    the PDU it came in (issue 17: appending each fragment to one growing buffer, then
    copying that buffer into the ``bytes`` the parser reads, copied every image twice;
    the pieces are joined once, by the store handler: ``dicom/server._taken``). A PDU is
    a buffer of its own, never reused (``reactor.BulkSocket.read_within``)."""

    context_id: int
    command: StoreCommand
    buffer: list[bytes | memoryview]


class StoreReceiver:
    """Per association, in the DUL thread: P-DATA-TF bodies in, complete requests out.

    ``eligible(context_id, command)`` gives the transfer syntax of an accepted context on
    which this request may take this path (None: pynetdicom's path). ``to_pynetdicom(cid,
    pdv)`` hands one PDV (control header + fragment) to pynetdicom's DIMSE provider and
    returns False when that provider has raised a protocol event (stop feeding);
    ``deliver(request)`` queues a complete request for the association's thread.
    """

    def __init__(self) -> None:
        self._current: _Message | None = None

    @property
    def busy(self) -> bool:
        """A request is being received on this path."""
        return self._current is not None

    def reset(self) -> None:
        self._current = None

    def claims(self, body: memoryview, pynetdicom_busy: bool,
               eligible: Any) -> bool:
        """Whether this PDU body belongs on this path: a request in progress here, or the
        first PDV is a whole C-STORE-RQ command this path may take."""
        if self._current is not None:
            return True
        if pynetdicom_busy or len(body) < 6:
            return False
        length, context_id, header = _PDV.unpack_from(body, 0)
        if header != 0x03 or length < 2 or 4 + length > len(body):
            return False
        command = parse_command(body[6:4 + length])
        return command is not None and eligible(context_id, command) is not None

    def feed(self, body: memoryview, pynetdicom_busy: Any, eligible: Any,
             to_pynetdicom: Any, deliver: Any) -> None:
        """Consume one P-DATA-TF body (the PDU without its 6-byte header); ``deliver``
        each complete request at once (a later PDV of the same PDU may start another
        message, whose response must come after this one's).

        Raises ``ProtocolError``; the caller aborts and calls ``reset``."""
        offset, end = 0, len(body)
        while offset < end:
            if offset + 6 > end:
                raise ProtocolError("PDV header truncated")
            length, context_id, header = _PDV.unpack_from(body, offset)
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError("PDV length outside the PDU")
            start, offset = offset + 6, offset + 4 + length
            current = self._current
            if current is not None:
                if header & 0x01:
                    raise ProtocolError("command fragment inside a dataset")
                if context_id != current.context_id:
                    raise ProtocolError("fragment on another presentation context")
                current.buffer.append(body[start:offset])
                if header & 0x02:
                    self._current = None
                    deliver(FastStore(current.context_id, current.command, current.buffer))
                continue
            command = (parse_command(body[start:offset])
                       if header == 0x03 and not pynetdicom_busy() else None)
            syntax = eligible(context_id, command) if command is not None else None
            if command is None or syntax is None:
                if not to_pynetdicom(context_id, bytes(body[start - 1:offset])):
                    break
                continue
            self._current = _Message(context_id, command, [
                file_meta(command.sop_class, command.sop_instance, syntax)])
