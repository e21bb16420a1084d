"""The C-STORE sub-operations of C-GET/C-MOVE on the wire, without per-PDU objects (issue 17).

Why: once retrieval sent the stored bytes as they are (``dicom/retrieve``), what was left of
a C-GET's time was pynetdicom's send path: the C-STORE-RQ command built as a pydicom
``Dataset`` and encoded, the object cut into one ``P_DATA`` primitive per PDU, each queued
to the DUL thread, turned into a state-machine event, a ``P_DATA_TF`` PDU object with a
PDV item object, encoded (copied) and written with its own ``send``. Here, for a stored
object the peer accepted as it is (``retrieve.Raw``):

- the command set is encoded directly (``encode_store_rq``: byte for byte what pynetdicom
  encodes, proved by a test), and the P-DATA-TF PDUs are laid out as 12-byte headers
  (PDU header + PDV header) and ``memoryview`` slices of the stored bytes: pynetdicom's
  fragmentation exactly (one PDV per PDU, ``max PDU - 6`` bytes per fragment, the peer's
  maximum as negotiated, 0 = one fragment; message control header bits per PS3.8 E.2:
  command 0x01/0x03, data 0x00/0x02);
- the whole message is one ``Wire``, written with gather writes (``sendmsg``; over TLS in
  batches of ``BATCH`` bytes, one ``sendall`` each) instead of one send per PDU: by the
  association thread itself when nothing is queued for the DUL before it (``write_now``,
  plain TCP), else queued as a primitive the DUL thread writes;
- on a C-GET, the peer's plain C-STORE-RSP is read by the DUL thread straight into its
  status (``answer``), and the *Pending* response goes out as a ``Wire`` too.

What stays pynetdicom's: one writer at a time (the DUL's write lock: the association
thread's ``write_now``, the DUL thread's own writes), in Sta6 or Sta8 only (the two states
where its DT-1 and AR-7 send a P-DATA-TF, the state unchanged), and only when no event is
pending before it (otherwise the event goes first, as it would for a queued P-DATA); a write
error is Evt17 (in the DUL thread) as in ``AssociationSocket.send``. A wire left in any
other state (the association aborted or closed meanwhile) is dropped, where pynetdicom would
have raised an invalid-event error in the DUL thread. The response is awaited exactly as
``send_c_store`` does (reactor paused, ``dimse.get_msg``, ``_check_received_status``);
everything the path does not recognise (a conversion, an unusual UID, an AE title that needs
care, bound DIMSE-sent handlers) goes through pynetdicom's ``send_c_store`` unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import ssl
import struct
import time
from typing import Any, TypeVar

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import _handlers, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("pacsvault.dicom")
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")  # its DEBUG level logs every message

# False: pynetdicom's send path only (tests compare both).
ENABLED = True
BATCH = 1 << 20  # bytes per sendall
# A reactor's TLS socket's timeout (``send_tls``, ``reactor.BulkSocket.read_within``): how
# often a wait for the peer looks at its own deadline
TLS_SLICE = 1.0
_STATES = frozenset({"Sta6", "Sta8"})  # DT-1 and AR-7: a P-DATA-TF is sent, state unchanged
_HEADER = struct.Struct(">BBLLBB")  # PDU type, reserved, PDU length, PDV length, context, MCH
_ELEMENT = struct.Struct("<HHI")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_AE = re.compile(r"[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?")
_IOV = 512  # pieces per sendmsg (the kernel's IOV_MAX is 1024)
_MAX_FRAGMENT = 0xFFFFFFFF - 6  # a PDU length field holds at most this much data + 6


class Wire(P_DATA):
    """A P-DATA request holding the encoded P-DATA-TF PDUs of one whole DIMSE message
    (headers and slices, written in order). Its PDV list stays empty: it is only ever
    written by ``WireDUL``."""

    def __init__(self, pieces: list[bytes | memoryview], size: int) -> None:
        super().__init__()
        self.pv_pieces = pieces
        self.pv_size = size
        self.pv_failed = False  # stands for a failed ``write_now``

    def __repr__(self) -> str:
        return f"Wire({self.pv_size} bytes)"


def _ui(elem: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0, elem, len(value)) + value


def _us(elem: int, value: int) -> bytes:
    return _ELEMENT.pack(0, elem, 2) + struct.pack("<H", value)


def encode_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int,
                    move_ae: str | None, move_id: int | None) -> bytes | None:
    """The C-STORE-RQ command set (implicit VR little endian) as pynetdicom encodes it, or
    None when a value is one this function leaves to pynetdicom (then its path is taken)."""
    if not (_UID.fullmatch(sop_class) and _UID.fullmatch(sop_instance)
            and len(sop_class) <= 64 and len(sop_instance) <= 64):
        return None
    if not (0 <= message_id <= 0xFFFF and priority in (0, 1, 2)):
        return None
    parts = [
        _ui(0x0002, sop_class),
        _us(0x0100, 0x0001),  # Command Field: C-STORE-RQ
        _us(0x0110, message_id),
        _us(0x0700, priority),
        _us(0x0800, 0x0001),  # Command Data Set Type: a dataset follows (pynetdicom's value)
        _ui(0x1000, sop_instance),
    ]
    if move_ae is not None:
        if not _AE.fullmatch(move_ae):
            return None
        ae = move_ae.encode("ascii")
        if len(ae) % 2:
            ae += b" "
        parts.append(_ELEMENT.pack(0, 0x1030, len(ae)) + ae)
    if move_id is not None:
        if not 0 <= move_id <= 0xFFFF:
            return None
        parts.append(_us(0x1031, move_id))
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body


def fragments(context_id: int, command: bytes, data: bytes | memoryview,
              max_pdu: int) -> tuple[list[bytes | memoryview], int] | None:
    """The P-DATA-TF PDUs of one message as (pieces, total bytes), cut as pynetdicom's
    ``encode_msg`` cuts them; None when ``max_pdu`` is one pynetdicom refuses (1..7)."""
    if 0 < max_pdu < 8:
        return None
    pieces: list[bytes | memoryview] = []
    total = 0
    with memoryview(data) as whole:
        view = whole.cast("B") if whole.format != "B" or whole.ndim != 1 else whole
        for payload, last_flag, more_flag in ((memoryview(command), 0x03, 0x01),
                                              (view, 0x02, 0x00)):
            size = len(payload)
            if not size and more_flag == 0x00:
                break  # no dataset: no data PDV (pynetdicom sends none either)
            step = max_pdu - 6 if max_pdu else max(size, 1)
            if step > _MAX_FRAGMENT:
                if size > _MAX_FRAGMENT:
                    return None
                step = _MAX_FRAGMENT
            # Every fragment but the last is a full one with the same 12 header bytes:
            # packed once (a peer's 16 KB maximum cuts a CT slice into ~32 PDUs: per
            # fragment packing was most of this function's time, issue 17).
            last = (max(size, 1) - 1) // step * step  # where the last fragment starts
            if last:
                full = _HEADER.pack(0x04, 0, step + 6, step + 2, context_id, more_flag)
                for start in range(0, last, step):
                    pieces.append(full)
                    pieces.append(payload[start:start + step])
                total += (last // step) * (12 + step)
            piece = payload[last:last + step]
            pieces.append(_HEADER.pack(0x04, 0, len(piece) + 6, len(piece) + 2,
                                       context_id, last_flag))
            pieces.append(piece)
            total += 12 + len(piece)
    return pieces, total


# --- the DUL side ---------------------------------------------------------------------


class WireDUL(DULServiceProvider):
    """Writes ``Wire`` primitives itself (see the module docstring); every other primitive
    is pynetdicom's. Mixed into the association's own DUL class by ``wire_dul``."""

    def _process_recv_primitive(self) -> bool:
        pending = self.to_provider_queue.queue
        if pending and isinstance(pending[0], Wire):
            if self.event_queue.qsize():
                return True  # the pending event goes first; the wire waits for the next round
            wire = self.to_provider_queue.get(False)
            assert isinstance(wire, Wire)
            if self.state_machine.current_state in _STATES:
                self._pv_write(wire)
            else:
                log.info("association no longer transferring: %d bytes not sent",
                         wire.pv_size)
            return True
        return bool(super()._process_recv_primitive())

    def _pv_write(self, wire: Wire) -> None:
        if wire.pv_failed:  # ``write_now`` failed: Evt17 in its place in the order
            self.event_queue.put("Evt17")
            return
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if sock is None or raw is None:
            log.warning("Attempted to send data over closed connection")
            return
        try:
            with _write_lock(self):
                if isinstance(raw, ssl.SSLSocket):  # no sendmsg: joined batches
                    _send_joined(raw, wire.pv_pieces, getattr(sock, "pv_wait_limit", None))
                else:
                    _send_gathered(raw, wire.pv_pieces)
        except Exception as exc:  # as AssociationSocket.send: Evt17, connection closed
            log.info("sending to the peer failed (%s)", type(exc).__name__)
            self.event_queue.put("Evt17")
        finally:
            wire.pv_pieces = []


def _write_lock(dul: Any) -> Any:
    lock = getattr(dul, "_pv_write_lock", None)
    return lock if lock is not None else contextlib.nullcontext()


def write_now(dul: Any, wire: Wire) -> bool:
    """Write ``wire`` from the calling (association) thread when the DUL thread would
    write it at once anyway: False (then it is queued for the DUL as before) unless the
    association is ``reactor``'s (its write lock), on a plain socket, in Sta6/Sta8, with
    nothing queued for the DUL before it (a primitive or an event: they go first).

    Why (issue 17): per C-GET sub-operation, handing the request to the DUL thread (queue,
    pipe wake-up, a thread switch on a busy 2-core machine) took a median 0.3 ms between
    the request being ready and its first byte being written, about a quarter of an
    object's cycle. The DUL thread keeps reading meanwhile (a C-CANCEL, an A-ABORT). TLS
    keeps the DUL thread's write (one thread per SSL object's writes and reads). A failed
    write is handed to the DUL thread as a failed ``Wire`` (Evt17 there, in order, in the
    state it checks), as its own failed write would be."""
    lock = getattr(dul, "_pv_write_lock", None)
    if lock is None:
        return False
    raw = getattr(dul.socket, "socket", None)
    if raw is None or isinstance(raw, ssl.SSLSocket):
        return False
    with lock:
        if (dul.state_machine.current_state not in _STATES or dul.to_provider_queue.queue
                or dul.event_queue.qsize()):
            return False
        try:
            _send_gathered(raw, wire.pv_pieces)
        except Exception as exc:
            log.info("sending to the peer failed (%s)", type(exc).__name__)
            failed = Wire([], 0)
            failed.pv_failed = True
            dul.send_pdu(failed)
        finally:
            wire.pv_pieces = []
    return True


def _send_joined(sock: Any, pieces: list[bytes | memoryview], limit: float | None) -> None:
    """The pieces in ``BATCH``-byte writes (a TLS socket has no ``sendmsg``); ``limit``:
    see ``send_tls``."""
    batch: list[bytes | memoryview] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= BATCH:
            send_tls(sock, b"".join(batch), limit)
            batch, size = [], 0
    if batch:
        send_tls(sock, b"".join(batch), limit)


def send_tls(sock: Any, data: bytes | bytearray | memoryview, limit: float | None) -> None:
    """All of ``data`` on a TLS socket. ``limit`` None: ``sendall``, within the socket's
    timeout. Otherwise the socket's timeout is a short slice (``TLS_SLICE``, set once by
    ``reactor.run_reactor``): a write that outlasts it is retried with the same bytes
    (OpenSSL resumes where it stopped) until ``limit`` seconds pass without one write
    completing, as the idle timeout bounded each ``sendall`` step before. Raises
    ``TimeoutError`` then.

    Why (issue 17): setting a socket's timeout is a system call (``ioctl``), and reading
    within a per-PDU deadline set and restored it around each TLS read, ~57 calls per
    received CT slice; a socket whose timeout is a fixed slice is never set again except
    in a read's last slice before its deadline."""
    if limit is None:
        sock.sendall(data)
        return
    with memoryview(data) as whole:
        view = whole
        deadline = time.monotonic() + limit
        while len(view):
            try:
                sent = sock.send(view)  # all of it: OpenSSL writes no partial record set
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                continue
            view = view[sent:]
            deadline = time.monotonic() + limit


def direct_fd(sock: Any) -> int:
    """The descriptor of a plain socket with a timeout, else -1: Python keeps such a
    socket non-blocking at the OS level, so ``readv``/``writev`` on it never wait and skip
    the ``poll`` (and GIL hand-over) its timeout costs (issue 17). Never a TLS socket's:
    its bytes must go through the SSL object. Never a blocking one's: it would wait
    without a deadline."""
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return -1
    timeout = sock.gettimeout()
    return sock.fileno() if timeout is not None and timeout > 0 else -1


def _send_gathered(sock: Any, pieces: list[bytes | memoryview]) -> None:
    """The pieces with ``sendmsg`` (gather writes, ``_IOV`` pieces at most per call),
    resumed where the kernel stopped: the stored bytes go from their buffer to the socket
    without first being joined into a copy (issue 17). What the kernel takes at once is
    written straight to the descriptor (``direct_fd``); only a write that would wait goes
    through the socket's timeout."""
    views = [p for p in pieces if len(p)]  # bytes, or memoryviews of bytes ("B")
    fd = direct_fd(sock)
    first = 0
    while first < len(views):
        sent = -1
        if fd >= 0:
            try:
                sent = os.writev(fd, views[first:first + _IOV])
            except BlockingIOError:
                sent = -1  # the send buffer is full: wait within the timeout
        if sent < 0:
            sent = sock.sendmsg(views[first:first + _IOV])
        while sent:
            size = len(views[first])
            if sent >= size:
                sent -= size
                first += 1
            else:
                views[first] = memoryview(views[first])[sent:]
                sent = 0


_WIRE_CLASSES: dict[type, type] = {}


def wire_dul(dul: DULServiceProvider) -> bool:
    """Make ``dul`` write ``Wire`` primitives (its class extended once, in place: its
    thread looks its methods up on each call). False if it cannot."""
    cls = type(dul)
    if issubclass(cls, WireDUL):
        return True
    if not issubclass(cls, DULServiceProvider):
        return False
    extended = _WIRE_CLASSES.get(cls)
    if extended is None:
        extended = _WIRE_CLASSES[cls] = type(f"Wire{cls.__name__}", (WireDUL, cls), {})
    dul.__class__ = extended
    return True


# --- the association side --------------------------------------------------------------


def _context(assoc: Any, sop_class: str, syntax: str) -> Any:
    """The accepted context pynetdicom's ``send_c_store`` would use for a ``Raw`` in its
    stored syntax, or None (then pynetdicom's path). Looked up once per (SOP class,
    syntax) of an association: ``_get_valid_context`` walks every accepted context, sorted
    again on each call, and a retrieving workstation often proposes over a hundred (that
    was per object; the accepted contexts do not change once established)."""
    cache: dict[tuple[str, str], Any] = assoc.__dict__.setdefault("_pv_store_contexts", {})
    key = (sop_class, syntax)
    if key not in cache:
        try:
            context = assoc._get_valid_context(sop_class, syntax, "scu",
                                               allow_conversion=False)
        except ValueError:
            context = None
        if context is not None and str(context.transfer_syntax[0]) != syntax:
            context = None
        cache[key] = context
    return cache[key]


def send_c_store(assoc: Any, raw: Any, msg_id: int, priority: int,
                 originator_aet: str | None, originator_id: int | None) -> Any:
    """``Association.send_c_store`` for a ``retrieve.Raw`` (stored bytes, stored syntax):
    its status ``Dataset``, or ``NotImplemented`` to take pynetdicom's path."""
    if not ENABLED or not assoc.is_established:
        return NotImplemented
    if sent_messages_watched(assoc):
        return NotImplemented
    sop_class, sop_instance, syntax = raw.__dict__["pv_uids"]
    context = _context(assoc, sop_class, syntax)
    if context is None:
        return NotImplemented  # pynetdicom raises again, as before, or takes it
    command = encode_store_rq(msg_id, sop_class, sop_instance, priority,
                              originator_aet, originator_id)
    if command is None:
        return NotImplemented
    body = raw.__dict__["pv_body"]
    cut = fragments(int(context.context_id), command, body, int(assoc.dimse.maximum_pdu_size))
    if cut is None or not wire_dul(assoc.dul):
        return NotImplemented
    pieces, size = cut
    count = _answers_here(assoc)
    dul = assoc.dul
    # As send_c_store: pause the reactor, send, wait for the response, resume.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    if count is not None:
        dul._pv_awaiting = (msg_id, int(context.context_id))
    wire = Wire(pieces, size)
    if not write_now(dul, wire):
        dul.send_pdu(wire)
    _cx_id, rsp = assoc.dimse.get_msg(block=True)
    if count is not None:
        dul._pv_awaiting = None
    assoc._reactor_checkpoint.set()
    if isinstance(rsp, StoreAnswer):
        count(rsp.status)
        return StoreStatus.of(rsp.status)  # what ``_check_received_status`` returns
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


_STATUS = Tag(0x00000900)


class StoreStatus(Dataset):
    """The status dataset ``send_c_store`` returns for an answer the DUL thread read:
    (0000,0900) as the peer encoded it (a ``RawDataElement``, implicit VR little endian,
    decoded by pydicom only if read as an element), and ``Status`` read without pydicom's
    keyword look-up.

    Why (issue 17): pynetdicom reads ``status.Status`` once per C-GET/C-MOVE
    sub-operation; building the ``DataElement`` (value validation) and reading it back
    through ``Dataset.__getattr__`` took 6.4 us alone (timeit; 3.0 us this way) and ~55 us
    per sub-operation in a py-spy ``--gil`` profile of a loaded server's C-GET. Anything
    else is a plain ``Dataset``: once (0000,0900) is set or deleted, ``Status`` is
    pydicom's again (``test_send_fastpath_conformance`` compares both)."""

    @classmethod
    def of(cls, status: int) -> StoreStatus:
        out = blank(cls)
        raw = RawDataElement(_STATUS, "US", 2, _US_VALUE.pack(status), 0, True, True)
        out._dict[_STATUS] = raw
        out.__dict__["pv_status"] = (raw, status)
        return out

    @property
    def Status(self) -> Any:  # the DICOM keyword, as pydicom spells it
        raw, status = self.__dict__.get("pv_status", (None, None))
        element = self._dict.get(_STATUS)
        if element is None:  # as ``Dataset.__getattr__`` for a keyword not there
            raise AttributeError("'StoreStatus' object has no attribute 'Status'")
        return status if element is raw else self[_STATUS].value


_D = TypeVar("_D", bound=Dataset)
# Per class: the state one ``__init__`` left, and the names of its containers (copied).
_BLANK: dict[type, tuple[dict[str, Any], tuple[str, ...]]] = {}


def blank(cls: type[_D]) -> _D:
    """An empty ``cls`` (``Dataset``, ``FileMetaDataset``) in the state its ``__init__``
    leaves, without running it.

    Why (issue 17): ``Dataset.__init__`` sets a dozen attributes through pydicom's
    ``__setattr__`` (a keyword look-up each); the datasets made per C-GET sub-operation
    (the ``Raw`` and its file meta, the status returned) were a visible share of the
    association thread's time. The state is copied from one ``__init__`` made, its
    containers copied, never shared (``test_retrieve_raw`` compares both)."""
    out = cls.__new__(cls)
    out.__dict__.update(blank_state(cls))
    return out


def blank_state(cls: type[Dataset]) -> dict[str, Any]:
    """The instance state ``blank`` gives a ``cls``: a fresh copy each call, its
    containers (dicts, lists) copied. The names of the containers are found once per
    class: testing every value's type on each call cost about as much as pydicom's
    ``__init__`` it replaces (three calls per C-GET sub-operation: issue 17)."""
    found = _BLANK.get(cls)
    if found is None:
        template = dict(cls().__dict__)
        found = _BLANK[cls] = (template, tuple(k for k, v in template.items()
                                               if isinstance(v, dict | list)))
    template, containers = found
    state = template.copy()
    for name in containers:
        state[name] = template[name].copy()
    return state


# --- the C-STORE-RSP, read by the DUL thread ----------------------------------------------


class StoreAnswer:
    """A C-STORE-RSP to the sub-operation awaited, read by the DUL thread (``answer``):
    queued for the association thread in place of pynetdicom's C-STORE primitive."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


_RSP_TAGS = (0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000)
_PDV = struct.Struct(">LBB")  # PDV item length, context ID, message control header
_US_VALUE = struct.Struct("<H")


def answer(body: bytes | bytearray | memoryview, awaiting: tuple[int, int]) -> StoreAnswer | None:
    """The C-STORE-RSP to ``awaiting`` (message ID, context ID) that this P-DATA-TF PDU
    body (the PDU without its 6-byte header) is, or None: then pynetdicom decodes it.

    Why (issue 17): after each sub-operation of a C-GET, pynetdicom turned the peer's
    12-element answer into a PDU object, a state-machine event, a decoded ``Dataset``,
    a message and a primitive before the next object could leave. Taken here only when
    it is plainly that answer: one PDV, one whole command fragment on the request's
    context, exactly the elements (0000,0000/0002/0100/0120/0800/0900/1000) in order,
    a right group length, C-STORE-RSP, the awaited message ID, no dataset. Anything else
    (an error comment, another message, a fragment) is left to pynetdicom as before."""
    if len(body) < 6:
        return None
    length, context_id, header = _PDV.unpack_from(body, 0)
    message_id, awaited_context = awaiting
    if header != 0x03 or context_id != awaited_context or 4 + length != len(body):
        return None
    offset, end = 6, len(body)
    values: list[int] = []
    for tag in _RSP_TAGS:
        if offset + 8 > end:
            return None
        group, elem, size = _ELEMENT.unpack_from(body, offset)
        offset += 8
        if group != 0 or elem != tag or offset + size > end:
            return None
        if tag == 0x0000:
            if size != 4 or int.from_bytes(body[offset:offset + 4], "little") != end - offset - 4:
                return None
        elif tag in (0x0002, 0x1000):
            if not 0 < size <= 64:
                return None
        elif size != 2:
            return None
        else:
            values.append(_US_VALUE.unpack_from(body, offset)[0])
        offset += size
    if offset != end:
        return None
    command_field, responding_to, data_set_type, status = values
    if (command_field, responding_to, data_set_type) != (0x8001, message_id, 0x0101):
        return None
    return StoreAnswer(status)


def take_answer(dul: Any, data: bytearray) -> bool:
    """In the DUL thread (``reactor.WakeableDUL``): a P-DATA-TF PDU that is the answer
    the association thread awaits (``dul._pv_awaiting``), queued for it as DT-2 would have
    queued pynetdicom's primitive (state unchanged, Sta6). False: pynetdicom's path, as
    before (another state, a message or a C-STORE request being received, not that
    answer)."""
    awaiting = dul._pv_awaiting
    receiver = dul._pv_receiver
    if (awaiting is None or dul.state_machine.current_state != "Sta6"
            or dul.assoc.dimse.message is not None
            or (receiver is not None and receiver.busy)):
        return False
    with memoryview(data) as view, view[6:] as body:
        found = answer(body, awaiting)
    if found is None:
        return False
    dul._pv_awaiting = None  # one answer per request: a second goes to pynetdicom
    dul.assoc.dimse.msg_queue.put((awaiting[1], found))
    return True


def answers_counted(handler: Any) -> Any:
    """Mark an ``EVT_DIMSE_RECV`` handler that only counts C-STORE answers, as the
    association's ``_pv_store_answered`` callback also does: a C-STORE-RSP read by the
    DUL thread (``answer``), which no ``EVT_DIMSE_RECV`` is triggered for, is counted by
    that callback instead."""
    handler.pv_answers_counted = True
    return handler


def _answers_here(assoc: Any) -> Any:
    """The callback that counts a C-STORE answer read by the DUL thread, or None when the
    answer must go through pynetdicom: no callback (``qr.on_get`` sets it), a DUL that
    does not read answers itself (``reactor.WakeableDUL``), or an ``EVT_DIMSE_RECV``
    handler that is neither pynetdicom's logger (below DEBUG) nor marked
    ``answers_counted`` (it would miss the message)."""
    count = assoc.__dict__.get("_pv_store_answered")
    if count is None or not hasattr(assoc.dul, "_pv_awaiting"):
        return None
    for handler in assoc.get_handlers(evt.EVT_DIMSE_RECV):
        func = handler[0] if isinstance(handler, tuple) else handler
        if func is _handlers.standard_dimse_recv_handler:
            if _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
                return None
        elif not getattr(func, "pv_answers_counted", False):
            return None
    return count


# --- C-GET/C-MOVE pending responses ---------------------------------------------------

_RSP_FIELD = {"C_GET": 0x8010, "C_MOVE": 0x8021}  # Command Field of the response
_COUNTS = ((0x1020, "NumberOfRemainingSuboperations"),
           (0x1021, "NumberOfCompletedSuboperations"),
           (0x1022, "NumberOfFailedSuboperations"),
           (0x1023, "NumberOfWarningSuboperations"))


def encode_retrieve_rsp(primitive: Any) -> bytes | None:
    """The command set of a C-GET/C-MOVE response without identifier, comment or offending
    element (the *Pending* sent after each sub-operation, a plain final status) as
    pynetdicom's ``primitive_to_message`` + ``encode`` write it; None for anything else."""
    field = _RSP_FIELD.get(type(primitive).__name__)
    if field is None or primitive.MessageIDBeingRespondedTo is None:
        return None
    if (primitive.Identifier or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None or primitive.Status is None):
        return None
    head = _rsp_head(field, primitive.AffectedSOPClassUID,
                     primitive.MessageIDBeingRespondedTo, primitive.Status)
    if head is None:
        return None
    parts = [head]
    for elem, keyword in _COUNTS:
        value = getattr(primitive, keyword)
        if value is not None:
            parts.append(_COUNT_HEADS[elem] + _US_VALUE.pack(int(value)))
    body = b"".join(parts)
    return _GROUP_LENGTH + struct.pack("<I", len(body)) + body


@functools.lru_cache(maxsize=256)
def _rsp_head(field: int, sop_class: Any, responding_to: Any, status: Any) -> bytes | None:
    """The elements of a retrieve response before its counts: the same for every
    *Pending* response of one C-GET/C-MOVE (one per sub-operation), so encoded once
    (issue 17: the response's encoding 17 -> 3.5 us, timeit; ~35 us per sub-operation in
    a py-spy ``--gil`` profile of a loaded server's C-GET). None when the SOP class is not
    one ``encode_retrieve_rsp`` writes."""
    parts = []
    if sop_class is not None:
        if not (_UID.fullmatch(str(sop_class)) and len(str(sop_class)) <= 64):
            return None
        parts.append(_ui(0x0002, str(sop_class)))
    parts += [_us(0x0100, field), _us(0x0120, int(responding_to)),
              _us(0x0800, 0x0101), _us(0x0900, int(status))]
    return b"".join(parts)


_GROUP_LENGTH = _ELEMENT.pack(0, 0x0000, 4)
_COUNT_HEADS = {elem: _ELEMENT.pack(0, elem, 2) for elem, _keyword in _COUNTS}


def send_msg(dimse: Any, primitive: Any, context_id: int) -> bool:
    """``DIMSEServiceProvider.send_msg`` for a response ``encode_retrieve_rsp`` takes: its
    one P-DATA queued for the DUL (True); False: pynetdicom's path."""
    if not ENABLED or type(primitive).__name__ not in _RSP_FIELD:
        return False
    assoc = dimse.assoc
    if sent_messages_watched(assoc):
        return False
    try:
        command = encode_retrieve_rsp(primitive)
    except (TypeError, ValueError, struct.error):
        return False
    limit = int(dimse.maximum_pdu_size)
    if command is None or (limit and len(command) + 6 > limit):
        return False
    if wire_dul(dimse.dul):
        # Written by the DUL thread like a C-STORE-RQ's PDUs, without pynetdicom's PDU
        # object, state-machine event and encoding per response (one per sub-operation:
        # issue 17); the same bytes (``fragments``: one PDU, one last-command PDV).
        wire = Wire(*_one_pdu(context_id, command))
        if not write_now(dimse.dul, wire):
            dimse.dul.send_pdu(wire)
        return True
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]  # type: ignore[list-item]
    dimse.dul.send_pdu(pdata)
    return True


def _one_pdu(context_id: int, command: bytes) -> tuple[list[bytes | memoryview], int]:
    """A command set as one P-DATA-TF PDU with one PDV (last command fragment, 0x03)."""
    header = _HEADER.pack(0x04, 0, len(command) + 6, len(command) + 2, context_id, 0x03)
    return [header + command], len(header) + len(command)


def sent_messages_watched(assoc: Any) -> bool:
    """Whether something would see the DIMSE messages sent on ``assoc`` (an EVT_DIMSE_SENT
    handler other than pynetdicom's own debug logger, or that logger at DEBUG): then the
    direct encoders step aside and pynetdicom sends, so the handler gets its message."""
    handlers = assoc.get_handlers(evt.EVT_DIMSE_SENT)
    if not handlers:
        return False
    for handler in handlers:
        func = handler[0] if isinstance(handler, tuple) else handler
        if func is not _handlers.standard_dimse_sent_handler:
            return True
    return _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG)


__all__ = ["BATCH", "ENABLED", "StoreAnswer", "StoreStatus", "Wire", "WireDUL", "answer",
           "answers_counted", "blank", "blank_state", "encode_retrieve_rsp", "encode_store_rq",
           "fragments", "send_c_store", "send_msg", "sent_messages_watched", "take_answer",
           "wire_dul", "write_now"]
