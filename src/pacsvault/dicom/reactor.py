"""Event-driven waits for pynetdicom's two polling loops (our accepted associations only).

pynetdicom 3.0 runs two threads per association, each polling with ``time.sleep(0.001)``:
the DUL reactor (socket <-> PDUs) and the association reactor (DIMSE messages -> our
handlers). On a busy machine every hop of a C-STORE round trip (PDU arrives, message
ready, response queued) waits for a sleeping thread to be scheduled again. Here each wait
ends as soon as there is something to do:

- the association reactor waits on its DIMSE message queue instead of sleeping;
- the DUL reactor waits in ``select`` on its socket and on a wake-up pipe that
  ``send_pdu`` writes to, instead of sleeping;
- the socket reads a PDU into a buffer of the PDU's size instead of 4 KiB ``recv`` calls
  appended one by one; bytes that have arrived straight from the descriptor (``readv``),
  the socket's timeout set only for a read that has to wait, and a socket the wait saw
  readable not polled again (issue 17: 25 system calls per one-instance study became 11
  in this thread, each one a point where the GIL may change hands).

The loops are otherwise pynetdicom's own (copied from 3.0, whose version is pinned): same
checks, same order, same timeouts. What either loop checks besides its queue/socket is
woken explicitly too: the DUL nudges the association thread when it hands it an
indication (release, abort) or ends, ``kill``/``kill_dul``/``stop_dul`` nudge the thread
they stop. So an idle thread no longer wakes every 1 ms (pynetdicom's period: ~a quarter
of a C-FIND association's server CPU went to those wake-ups, issue 17); what is not woken
(ARTIM, idle timer, connection deadlines, a DUL that just ended) is seen within ``IDLE_TICK``.

In Sta6, the P-DATA-TF PDUs of a plainly well-formed C-STORE request are parsed straight
into one command and one dataset buffer, and the request answered with a directly encoded
C-STORE-RSP (``dicom/storewire``, issue 17), and the C-STORE-RSP a C-GET sub-operation
awaits is read straight into its status (``dicom/sendpath.answer``); every other PDU,
state and message takes pynetdicom's path as before.

With a ``ConnectionGuard`` (``dicom/limits``) the DUL also enforces the resource budget:
PDU length checked *before* any buffer is allocated (small cap before the association,
the negotiated maximum after it), buffers that grow with the bytes that actually arrive,
a deadline for every phase (first byte, association request, each PDU), and one line
per peer-caused error instead of pynetdicom's tracebacks. A violation sends A-ABORT,
closes the connection, frees its budget at once and is recorded (aggregated).

This module is the DUL side (``WakeableDUL``, ``BulkSocket``: the socket, the wake-up
pipe, the budget) and ``accelerate``, which installs both sides; the association side
(its loop, the direct C-STORE request it serves) is ``dicom/assocreactor``, which the DUL
thread only wakes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from pacsvault.dicom import sendpath
from pacsvault.dicom.assocreactor import IDLE_TICK, FastAssociation, StoreHandler, nudge
from pacsvault.dicom.limits import SECONDS_PER_MIB, ConnectionGuard
from pacsvault.dicom.storewire import FastStore, ProtocolError, StoreCommand, StoreReceiver

# Importers (listener, tests, benchmarks) find the association side here too.
__all__ = ["FAST_STORE", "BulkSocket", "FastAssociation", "StoreHandler", "WakeableDUL",
           "accelerate", "accelerate_requestors"]

log = logging.getLogger("pacsvault.dicom")

_TICK = 0.001  # pynetdicom's loop period (the fallback wait when there is no socket)
# The direct C-STORE receive path (``dicom/storewire``); False: pynetdicom's path only
# (tests compare both).
FAST_STORE = True
# DUL states before an association is established (acceptor side), PS3.8 9.2
_BEFORE_ASSOCIATION = frozenset({"Sta1", "Sta2", "Sta3", "Sta13"})
_PDU_TYPES = frozenset(range(0x01, 0x08))
# Largest buffer allocated before its bytes arrive; bigger PDUs grow as they are read.
_GROW_STEP = 4 << 20
_MIB = float(1 << 20)
# A-ABORT reason-diagnostics (PS3.8 9.3.8), source "service provider"
_ABORT_NOT_SPECIFIED = 0x00
_ABORT_UNEXPECTED_PDU = 0x02
_ABORT_INVALID_PARAMETER = 0x06
# Whether SOP classes are served by pynetdicom's Storage Service Class (C-STORE requests
# for any other class keep pynetdicom's path, whatever it does with them).
_STORAGE_CLASS: dict[str, bool] = {}


def _is_storage(uid: str) -> bool:
    known = _STORAGE_CLASS.get(uid)
    if known is None:
        known = _STORAGE_CLASS[uid] = uid_to_service_class(uid) is StorageServiceClass
    return known


class WakeableDUL(DULServiceProvider):
    _pv_wake: tuple[int, int] | None = None
    _pv_wake_lock = threading.Lock()  # replaced per instance in run_reactor
    _pv_guard: ConnectionGuard | None = None
    _pv_start = 0.0
    _pv_seen_bytes = False

    _pv_waiting = False  # the DUL thread is in (or about to enter) ``_pv_wait``
    _pv_readable = False  # ``_pv_wait`` saw the socket readable; no PDU read since
    # Held by whoever writes to the socket (``BulkSocket.send``, ``sendpath``); replaced
    # per instance by ``accelerate``
    _pv_write_lock = threading.Lock()
    _pv_receiver: StoreReceiver | None = None  # the direct C-STORE path (issue 17)
    # (message ID, context ID) of the C-GET sub-operation whose C-STORE-RSP this thread
    # reads itself (``sendpath.take_answer``); set by ``sendpath.send_c_store``
    _pv_awaiting: tuple[int, int] | None = None

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)  # queued for the DUL thread
        # A running DUL thread looks at its queue before it waits again (``_pv_wait``
        # raises the flag first, then looks): no wake-up needed, no pipe write, no switch.
        if self._pv_waiting:
            self._pv_poke()

    def _pv_poke(self) -> None:
        """Wake the DUL thread if it waits (a full pipe: a wake-up is pending already)."""
        with self._pv_wake_lock:
            if self._pv_wake is not None:
                with contextlib.suppress(OSError):
                    os.write(self._pv_wake[1], b"\0")

    def kill_dul(self) -> None:
        """pynetdicom's, with the waiting DUL thread woken to see the flag at once."""
        self._kill_thread = True
        self._pv_poke()

    def stop_dul(self) -> bool:  # pynetdicom 3.0, with the wait woken at once
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._pv_poke()
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    def _pv_wait(self) -> None:
        """Up to ``IDLE_TICK``, less if data arrives, something is queued to send or the
        thread is stopped."""
        wake = self._pv_wake
        sock = getattr(self.socket, "socket", None)
        self._pv_waiting = True
        try:
            # Flag raised, then the queue looked at: a ``send_pdu`` that saw the flag down
            # had queued its PDU before, so it is seen here (the GIL orders both threads).
            if self.to_provider_queue.queue:
                return
            if (wake is None or sock is None or sock.fileno() < 0
                    or not getattr(self.socket, "_is_connected", True)):
                # (a requestor before its connection: ``select`` would see an unconnected
                # socket readable at once, every turn)
                raise ValueError("nothing to wait on")
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: ``select`` cannot see them
            ready, _, _ = select.select([sock, wake[0]], [], [], IDLE_TICK)
        except (OSError, ValueError):
            time.sleep(_TICK)
            return
        finally:
            self._pv_waiting = False
        self._pv_readable = sock in ready
        if wake[0] in ready:
            with contextlib.suppress(OSError):
                os.read(wake[0], 4096)

    def _is_transport_event(self) -> bool:
        """pynetdicom's, without its zero-timeout ``select`` when ``_pv_wait`` saw the
        socket readable and no PDU was read since (only this thread reads it, so it still
        is): issue 17, one system call (and GIL hand-over) less per PDU."""
        readable, self._pv_readable = self._pv_readable, False
        sock = self.socket
        if (readable and sock is not None and sock._is_connected
                and self.state_machine.current_state != "Sta13"):
            self._read_pdu_data()
            return True
        return bool(super()._is_transport_event())

    def run_reactor(self) -> None:  # pynetdicom 3.0 DULServiceProvider.run_reactor
        self._pv_start = time.monotonic()
        guard = self._pv_guard
        raw = getattr(self.socket, "socket", None)
        if guard is not None and raw is not None:
            # Sends too: a peer that stops reading cannot hold this thread forever. A TLS
            # socket's timeout is a fixed slice instead, set once: its reads and writes look
            # at their own deadlines between slices (``read_within``, ``sendpath.send_tls``)
            # instead of setting the socket's timeout around each read (issue 17: two
            # ``ioctl`` calls per read, ~57 per received CT slice). Only this thread reads
            # and writes a TLS association's socket (``sendpath.write_now``).
            idle = guard.limits.idle_timeout
            with contextlib.suppress(OSError):
                if isinstance(raw, ssl.SSLSocket) and isinstance(self.socket, BulkSocket):
                    self.socket.pv_wait_limit = idle
                    raw.settimeout(min(sendpath.TLS_SLICE, idle))
                else:
                    raw.settimeout(idle)
        self._pv_wake_lock = threading.Lock()
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        with self._pv_wake_lock:
            self._pv_wake = (read_end, write_end)
        try:
            self._pv_loop()
        finally:
            nudge(self.assoc)  # it checks whether this thread still runs
            with self._pv_wake_lock:
                self._pv_wake = None
                os.close(read_end)
                os.close(write_end)

    def _pv_loop(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._pv_wait()  # was: time.sleep(self._run_loop_delay)
            if self._kill_thread:
                break
            if self._pv_guard is not None and self.state_machine.current_state == "Sta2":
                self._pv_check_request_deadline(self._pv_guard)
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("exception in the DUL reactor (%s), aborting the association",
                          type(exc).__name__)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                if self.socket is not None:
                    self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            if self.to_user_queue.queue:  # an indication (release, abort) to act on
                nudge(self.assoc)
            sleep = False


    # --- the resource budget ----------------------------------------------------------

    def _pv_associated(self) -> bool:
        return self.state_machine.current_state not in _BEFORE_ASSOCIATION

    def _pv_check_request_deadline(self, guard: ConnectionGuard) -> None:
        """Nothing (or not a whole association request) in time: cut, record."""
        limits = guard.limits
        allowed = limits.association_timeout if self._pv_seen_bytes else limits.connect_timeout
        if time.monotonic() - self._pv_start > allowed:
            phase = "association-request" if self._pv_seen_bytes else "first-byte"
            self._pv_cut(guard, "deadline", {"phase": phase}, _ABORT_NOT_SPECIFIED)

    def _pv_cut(self, guard: ConnectionGuard, reason: str,
                detail: dict[str, str | int | bool], abort_reason: int) -> None:
        """A-ABORT, close, free the budget now, record (aggregated)."""
        waiting_for_request = self.state_machine.current_state == "Sta2"
        guard.refuse(reason, detail)
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if sock is not None and raw is not None:
            abort = A_ABORT_RQ()
            abort.source = 0x02
            abort.reason_diagnostic = abort_reason
            with contextlib.suppress(OSError, ValueError), self._pv_write_lock:
                raw.settimeout(1.0)
                raw.sendall(abort.encode())
            sock.close()  # queues Evt17: the state machine goes back to Sta1
        guard.release()
        if waiting_for_request:
            # The association thread waits for an A-ASSOCIATE request (for the ACSE
            # timeout): None is "nothing came", it stops now and frees its thread.
            cast(Any, self.to_user_queue).put(None)  # (typed without None)

    def _pv_closed(self) -> None:
        """The peer closed (a scanner, a TLS probe, a modality giving up): Evt17 for the
        state machine, and if the association thread still waits for the A-ASSOCIATE
        request, None ("nothing came") so it ends now and gives the source's connection
        slot back, instead of holding it until the ACSE timeout (eight such hang-ups used
        to lock an address out for 30 s)."""
        waiting_for_request = self.state_machine.current_state == "Sta2"
        self.event_queue.put("Evt17")
        if waiting_for_request:
            cast(Any, self.to_user_queue).put(None)  # (typed without None)

    def _pv_malformed(self, guard: ConnectionGuard, why: str, associated: bool) -> None:
        if associated:
            guard.refuse("malformed-pdu", {"what": why, "phase": "association"})
            self.event_queue.put("Evt19")  # pynetdicom's own path: A-ABORT, indication
        else:
            self._pv_cut(guard, "malformed-pdu", {"what": why, "phase": "association-request"},
                         _ABORT_UNEXPECTED_PDU)

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0's ``_read_pdu_data`` within the connection's budget."""
        guard = self._pv_guard
        sock = self.socket
        if guard is None and isinstance(sock, BulkSocket) and self._pv_awaiting is not None:
            self._pv_read_unguarded(sock)
            return
        if guard is None or not isinstance(sock, BulkSocket):
            super()._read_pdu_data()
            return
        associated = self._pv_associated()
        if associated:
            deadline, phase = time.monotonic() + guard.limits.pdu_timeout, "pdu"
        else:
            deadline = self._pv_start + guard.limits.association_timeout
            phase = "association-request"
        data, length = bytearray(), 0
        try:
            header = sock.read_within(6, deadline, earn=associated)
            if len(header) == 6:
                self._pv_seen_bytes = True
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type not in _PDU_TYPES:
                    self._pv_malformed(guard, f"unknown PDU type 0x{pdu_type:02X}", associated)
                    return
                if not associated and pdu_type not in (0x01, 0x07):
                    self._pv_malformed(guard, f"PDU type 0x{pdu_type:02X} before association",
                                       associated)
                    return
                limit = guard.limits.pdu_limit(associated)
                if length > limit:
                    self._pv_cut(guard, "oversized-pdu",
                                 {"announced": length, "limit": limit, "phase": phase},
                                 _ABORT_INVALID_PARAMETER)
                    return
                data = sock.read_within(length, deadline, earn=associated, prefix=header)
        except TimeoutError:
            self._pv_cut(guard, "deadline", {"phase": phase}, _ABORT_NOT_SPECIFIED)
            return
        except OSError as exc:
            log.info("connection from %s closed while reading a PDU (%s)", guard.address,
                     type(exc).__name__)
            self._pv_closed()
            return
        if len(header) < 6 or len(data) != 6 + length:
            self._pv_closed()  # the peer closed mid-PDU
            return
        if (associated and data[0] == 0x04 and self._pv_awaiting is not None
                and sendpath.take_answer(self, data)):
            return  # the C-STORE-RSP of a C-GET sub-operation, queued as DT-2 would
        if (associated and data[0] == 0x04 and self._pv_receiver is not None
                and self.state_machine.current_state == "Sta6"
                and self._pv_pdata(guard, self._pv_receiver, data)):
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            self._pv_malformed(guard, type(exc).__name__, associated)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _pv_read_unguarded(self, sock: BulkSocket) -> None:
        """pynetdicom 3.0's ``_read_pdu_data`` (same events), for a connection without a
        budget (our requestors: a C-MOVE's sub-association) awaiting a C-STORE-RSP: that
        answer is read straight into its status (``sendpath.take_answer``), as on a C-GET
        the request's own association does."""
        try:
            header = sock.recv(6)
            if len(header) == 6:
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type not in _PDU_TYPES:
                    log.error("unknown PDU type 0x%02X received", pdu_type)
                    self.event_queue.put("Evt19")
                    return
                header += sock.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport connection closed
            return
        if len(header) < 6 or len(header) != 6 + length:
            self.event_queue.put("Evt17")  # the peer closed mid-PDU
            return
        if header[0] == 0x04 and sendpath.take_answer(self, header):
            return
        try:
            pdu, event = self._decode_pdu(header)
        except Exception as exc:
            log.error("unable to decode a received PDU (%s)", type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    # --- the direct C-STORE path (dicom/storewire) ---------------------------------------

    def _pv_pdata(self, guard: ConnectionGuard, receiver: StoreReceiver,
                  data: bytearray) -> bool:
        """A P-DATA-TF PDU in Sta6 (state unchanged, as DT-2 leaves it): False if it is
        not for this path (then pynetdicom decodes it as always)."""
        dimse = self.assoc.dimse
        with memoryview(data) as view, view[6:] as body:
            if not receiver.claims(body, dimse.message is not None, self._pv_eligible):
                return False
            try:
                receiver.feed(body, lambda: dimse.message is not None, self._pv_eligible,
                              self._pv_to_dimse, self._pv_deliver)
            except ProtocolError as exc:
                receiver.reset()
                self._pv_malformed(guard, str(exc), True)  # A-ABORT, nothing stored
        return True

    def _pv_deliver(self, request: FastStore) -> None:
        """A complete request, queued for the association thread as DIMSE queues its
        messages (in order with them)."""
        self.assoc.dimse.msg_queue.put((request.context_id, request))  # type: ignore[arg-type]

    def _pv_eligible(self, context_id: int, command: StoreCommand) -> str | None:
        """The transfer syntax of the accepted context, if pynetdicom would serve this
        request with its Storage Service Class (else None: its own path)."""
        assoc = self.assoc
        if assoc._sent_release:
            return None
        context = assoc._accepted_cx.get(context_id)
        if context is None or not context.transfer_syntax:
            return None
        uid = command.sop_class
        if uid in assoc.acceptor.accepted_common_extended:
            return None
        if not (_config.UNRESTRICTED_STORAGE_SERVICE or _is_storage(uid)):
            return None
        return str(context.transfer_syntax[0])

    def _pv_to_dimse(self, context_id: int, pdv: bytes) -> bool:
        """One PDV of another message, to pynetdicom's DIMSE provider as DT-2 gives it
        (False: it raised a protocol event; the rest of the PDU is not read)."""
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, pdv]]  # type: ignore[list-item]
        before = self.event_queue.qsize()
        self.assoc.dimse.receive_primitive(primitive)
        return self.event_queue.qsize() == before


class BulkSocket(AssociationSocket):
    # Set by ``run_reactor`` on a TLS socket whose timeout it made a short slice: the
    # longest wait for the peer (the idle timeout) its writes are retried within.
    pv_wait_limit: float | None = None

    def send(self, bytestream: bytes) -> None:
        """pynetdicom's, under the DUL's write lock (``sendpath.write_now`` writes from
        the association thread under it too: never two writers in one stream)."""
        lock = getattr(self.assoc.dul, "_pv_write_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            if self.pv_wait_limit is not None:
                self._pv_send_tls(bytestream)
            else:
                super().send(bytestream)

    def _pv_send_tls(self, bytestream: bytes) -> None:
        """``AssociationSocket.send`` on a sliced TLS socket: same events."""
        try:
            sendpath.send_tls(self.socket, bytestream, self.pv_wait_limit)
            evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:
            self.event_queue.put("Evt17")  # transport connection closed

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closed), straight into one buffer
        that never runs ahead of the bytes received by more than ``_GROW_STEP`` (an
        announced PDU length is only a claim: a connection without a budget, such as a
        C-MOVE's sub-association, reads its PDUs here)."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(min(nr_bytes, _GROW_STEP))
        got = 0
        while got < nr_bytes:
            if got == len(buffer):
                buffer.extend(bytes(min(nr_bytes - got, len(buffer))))
            with memoryview(buffer) as view, view[got:] as free:
                n = sock.recv_into(free, min(len(free), 1 << 20))
            if not n:  # the peer closed: what arrived, as pynetdicom returns it
                break
            got += n
        return buffer if got == nr_bytes else buffer[:got]

    def read_within(self, nr_bytes: int, deadline: float, *, earn: bool = False,
                    prefix: bytes | bytearray = b"") -> bytearray:
        """``prefix`` + up to ``nr_bytes`` read before ``deadline`` (monotonic).

        The buffer never runs ahead of the bytes received by more than ``_GROW_STEP``
        (an announced length is only a claim). ``earn``: each MiB received pushes the
        deadline one second later. Raises ``TimeoutError`` when the deadline passes;
        returns fewer bytes only if the peer closed. The socket is left with the idle
        timeout it had.

        Bytes that have arrived already are read straight from a plain socket's descriptor
        (``sendpath.direct_fd``), one system call; only a read that would wait sets the
        deadline as the socket's timeout. Why (issue 17): through the
        timeout, each read was four calls (the timeout set and restored, each an
        ``ioctl``, a ``poll``, the ``recv``), ~16 per stored one-instance study, and each
        one a point where another thread takes the GIL (~48 thread switches per image
        with four associations, ``bench/compare/switches``). A TLS socket whose timeout
        ``run_reactor`` made a short slice is read through that timeout (OpenSSL waits
        in C, no Python exception per wait), the deadline looked at between slices; only
        the last slice before it is set to what remains.
        """
        sock = self.socket
        assert sock is not None
        idle = sock.gettimeout()
        fd = sendpath.direct_fd(sock)
        tls_slice = idle if self.pv_wait_limit is not None else None  # ``run_reactor``'s
        timed = False
        start = len(prefix)
        want = start + nr_bytes
        buffer = bytearray(start + min(nr_bytes, _GROW_STEP))
        buffer[:start] = prefix
        got = start
        try:
            while got < want:
                if got == len(buffer):
                    buffer.extend(bytes(min(want - got, len(buffer))))
                bonus = (got - start) / _MIB * SECONDS_PER_MIB if earn else 0.0
                remaining = deadline + bonus - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("read deadline")
                with memoryview(buffer) as view, \
                        view[got:got + min(len(buffer) - got, 1 << 20)] as free:
                    n = -1
                    if fd >= 0:
                        try:
                            n = os.readv(fd, [free])
                        except BlockingIOError:
                            n = -1  # nothing yet: wait for it within the deadline
                    elif tls_slice is not None:
                        if remaining < tls_slice:  # the last slice: the deadline's own
                            sock.settimeout(remaining)
                            timed = True
                        try:
                            n = sock.recv_into(free)
                        except TimeoutError:
                            continue  # a slice passed: the deadline decides
                    if n < 0:
                        sock.settimeout(remaining)
                        timed = True
                        n = sock.recv_into(free)
                if not n:
                    break
                got += n
        finally:
            if timed:
                with contextlib.suppress(OSError):
                    sock.settimeout(idle)
        if got < len(buffer):
            del buffer[got:]
        return buffer


def accelerate_requestors(ae: Any) -> None:
    """Every association ``ae`` requests (a C-MOVE's sub-association, ``dicom send``,
    echo) gets a ``WakeableDUL`` and a ``BulkSocket``: ``AE.associate`` creates its socket
    (``_create_socket``) before its DUL thread starts, which is when the class can change.

    Why (issue 17): pynetdicom's DUL thread sleeps 1 ms between looks at the socket, so
    each C-STORE-RSP of a C-MOVE sub-operation waited for it (and was then decoded as a
    whole DIMSE message) before the next object could leave: the C-MOVE row ran at 0.41-0.44
    of Orthanc's while the C-GET of the same study, on an accelerated association, ran
    ahead. The association thread stays pynetdicom's (``patches._run_reactor``); the
    socket's reads grow with the bytes received (``BulkSocket.recv``): such a connection
    has no budget. Idempotent per AE."""
    original = ae._create_socket
    if getattr(original, "pv_accelerates", False):
        return

    def create_socket(assoc: Association, *args: Any, **kwargs: Any) -> AssociationSocket:
        sock = original(assoc, *args, **kwargs)
        dul = assoc.dul
        if type(dul) is DULServiceProvider and not dul.is_alive():
            dul.__class__ = WakeableDUL
            assert isinstance(dul, WakeableDUL)
            dul._pv_write_lock = threading.Lock()
            dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]
            if type(sock) is AssociationSocket:
                sock.__class__ = BulkSocket
        return cast(AssociationSocket, sock)

    create_socket.pv_accelerates = True  # type: ignore[attr-defined]
    ae._create_socket = create_socket


def accelerate(assoc: Association, guard: ConnectionGuard | None = None,
               store: StoreHandler | None = None) -> None:
    """Switch a just-created acceptor association (not started yet) to the classes above.

    With ``guard``, its reads follow the connection's budget and it gives the budget back
    when its thread ends; with ``store`` too, C-STORE requests take the direct path
    (``dicom/storewire``) to that handler.
    """
    assoc.__class__ = FastAssociation
    dul = assoc.dul
    dul.__class__ = WakeableDUL
    assert isinstance(dul, WakeableDUL)
    dul._pv_write_lock = threading.Lock()
    if guard is not None:
        assert isinstance(assoc, FastAssociation) and isinstance(dul, WakeableDUL)
        dul._pv_guard = guard
        assoc._pv_on_exit = guard.release
        if store is not None and FAST_STORE:
            assoc._pv_store = store
            dul._pv_receiver = StoreReceiver()
    # The DUL thread's target was bound to pynetdicom's run_reactor at construction.
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = BulkSocket
