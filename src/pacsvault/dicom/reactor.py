"""Event-driven waits for pynetdicom's two polling loops (our accepted associations only).

pynetdicom 3.0 runs two threads per association, each polling with ``time.sleep(0.001)``:
the DUL reactor (socket <-> PDUs) and the association reactor (DIMSE messages -> our
handlers). On a busy machine every hop of a C-STORE round trip (PDU arrives, message
ready, response queued) waits for a sleeping thread to be scheduled again. Here each wait
ends as soon as there is something to do:

- the association reactor waits on its DIMSE message queue instead of sleeping;
- the DUL reactor waits in ``select`` on its socket and on a wake-up pipe that
  ``send_pdu`` writes to, instead of sleeping;
- the socket reads a PDU with ``recv_into`` a buffer of the PDU's size instead of 4 KiB
  ``recv`` calls appended one by one.

The loops are otherwise pynetdicom's own (copied from 3.0, whose version is pinned): same
checks, same order, same timeouts; at most 1 ms between two rounds, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

log = logging.getLogger("pacsvault.dicom")

_TICK = 0.001  # pynetdicom's loop period, kept as the longest wait


class FastAssociation(Association):
    def _run_reactor(self) -> None:  # pynetdicom 3.0 Association._run_reactor
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            # was: time.sleep(0.001); now returns as soon as a message is queued
            with messages.not_empty:
                if not messages._qsize():
                    messages.not_empty.wait(_TICK)

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                _trigger(self, "EVT_RELEASED")
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                _trigger(self, "EVT_ABORTED")
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _trigger(assoc: Association, name: str) -> None:
    evt.trigger(assoc, getattr(evt, name), {})


class WakeableDUL(DULServiceProvider):
    _pv_wake: tuple[int, int] | None = None
    _pv_wake_lock = threading.Lock()  # replaced per instance in run_reactor

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        with self._pv_wake_lock:
            if self._pv_wake is not None:
                # a full pipe means a wake-up is pending already
                with contextlib.suppress(OSError):
                    os.write(self._pv_wake[1], b"\0")

    def _pv_wait(self) -> None:
        """Up to one tick, less if data arrives or something is queued to send."""
        wake = self._pv_wake
        sock = getattr(self.socket, "socket", None)
        try:
            if wake is None or sock is None or sock.fileno() < 0:
                raise ValueError("nothing to wait on")
            ready, _, _ = select.select([sock, wake[0]], [], [], _TICK)
        except (OSError, ValueError):
            time.sleep(_TICK)
            return
        if wake[0] in ready:
            with contextlib.suppress(OSError):
                os.read(wake[0], 4096)

    def run_reactor(self) -> None:  # pynetdicom 3.0 DULServiceProvider.run_reactor
        self._pv_wake_lock = threading.Lock()
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        with self._pv_wake_lock:
            self._pv_wake = (read_end, write_end)
        try:
            self._pv_loop()
        finally:
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
            sleep = False


class BulkSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closed), straight into one buffer."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], min(nr_bytes - got, 1 << 20))
                if not n:  # the peer closed: what arrived, as pynetdicom returns it
                    break
                got += n
        finally:
            view.release()
        return buffer if got == nr_bytes else buffer[:got]


def accelerate(assoc: Association) -> None:
    """Switch a just-created acceptor association (not started yet) to the classes above."""
    assoc.__class__ = FastAssociation
    dul = assoc.dul
    dul.__class__ = WakeableDUL
    # The DUL thread's target was bound to pynetdicom's run_reactor at construction.
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = BulkSocket
