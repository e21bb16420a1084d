"""The association side of ``dicom/reactor``: pynetdicom 3.0's association reactor
(DIMSE messages -> our handlers), waiting on its DIMSE queue instead of sleeping 1 ms.

A module of its own because it is the half of the reactor the DUL thread only *wakes*
(``nudge``): the loop, the direct C-STORE request it is handed (``dicom/storewire``) and
the C-STORE-RSP it writes back. The DUL side (socket <-> PDUs, the wake-up pipe, the
``ConnectionGuard`` budget) and ``accelerate``, which installs both, stay in
``dicom/reactor``, whose docstring tells the whole design.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from pacsvault.dicom import sendpath
from pacsvault.dicom.patches import reactor_paused_by_sender
from pacsvault.dicom.storewire import FastStore, StoreCommand, encode_store_rsp

log = logging.getLogger("pacsvault.dicom")

# The longest wait of an idle loop (both threads): only timers (ARTIM, idle, connection
# deadlines, all seconds long) and a DUL thread that just ended wait for it; everything
# else wakes the thread at once.
IDLE_TICK = 0.02
_HANDLER_FAILED = 0xC211  # pynetdicom's status when the C-STORE handler raises

# (association, command, Part 10 stream, presentation context) -> DIMSE status
StoreHandler = Callable[[Association, StoreCommand, list[bytes | memoryview],
                         PresentationContext], int]


class FastAssociation(Association):
    _pv_on_exit: Callable[[], None] | None = None
    # Sealed mode: answers a DIMSE request itself (True) before any service class runs.
    _pv_intercept: Callable[[Association, Any, int], bool] | None = None
    # The C-STORE handler of the direct receive path (None: pynetdicom's path only).
    _pv_store: StoreHandler | None = None
    _pv_nudges = 0  # counts ``_nudge`` calls (under the DIMSE queue's lock)

    def run(self) -> None:
        """pynetdicom's thread body, then this connection's budget is given back."""
        try:
            super().run()
        finally:
            if self._pv_on_exit is not None:
                self._pv_on_exit()

    def kill(self) -> None:
        """pynetdicom's, with the association thread woken at once to see ``_kill``."""
        self._kill = True
        nudge(self)
        super().kill()

    def _run_reactor(self) -> None:  # pynetdicom 3.0 Association._run_reactor
        self._is_paused = False
        messages = self.dimse.msg_queue
        seen = -1
        while not self._kill:
            # was: time.sleep(0.001); now returns as soon as a message is queued or the
            # DUL nudges (a nudge since the last checks began: no wait at all)
            with messages.not_empty:
                if not messages._qsize() and self._pv_nudges == seen:
                    messages.not_empty.wait(IDLE_TICK)
                seen = self._pv_nudges

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if reactor_paused_by_sender(self):  # a sender paused it meanwhile: go round
                continue

            context_id, msg = self.dimse.get_msg(block=False)
            if isinstance(msg, FastStore):
                self._pv_fast_store(msg)
            elif msg:
                intercept = self._pv_intercept
                if intercept is None or not intercept(self, msg, int(context_id)):  # type: ignore[arg-type]
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


    def _pv_fast_store(self, msg: FastStore) -> None:
        """pynetdicom's ``_serve_request`` and ``StorageServiceClass.SCP`` for a request
        received on the direct path: same checks, same statuses, same response."""
        if self._sent_release:
            log.warning("C-STORE request received during association release, ignoring")
            return
        context = self._accepted_cx.get(msg.context_id)
        handler = self._pv_store
        if context is None or handler is None:
            self.abort()
            return
        self.dimse.cancel_req = {}
        self._is_paused = True
        failed = False
        try:
            status = handler(self, msg.command, msg.part10, context)
        except Exception as exc:
            log.error("exception in the C-STORE handler (%s)", type(exc).__name__)
            status, failed = _HANDLER_FAILED, True
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}
        if failed or self.is_established:
            self._pv_store_rsp(msg.context_id, msg.command, status)

    def _pv_store_rsp(self, context_id: int, command: StoreCommand, status: int) -> None:
        encoded = encode_store_rsp(command.message_id, command.sop_class,
                                   command.sop_instance, status)
        limit = self.dimse.maximum_pdu_size
        if limit and len(encoded) + 12 > limit:  # fragments: pynetdicom's encoder
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = command.message_id
            rsp.AffectedSOPClassUID = command.sop_class
            rsp.AffectedSOPInstanceUID = command.sop_instance
            rsp.Status = status
            self.dimse.send_msg(rsp, context_id)
            return
        dul = self.dul
        if sendpath.ENABLED and sendpath.wire_dul(dul):
            # Issue 17: written by this thread when the DUL thread would write it at once
            # anyway (``sendpath.write_now``: plain TCP, Sta6/Sta8, nothing queued before
            # it), else queued as one ``Wire``: the same bytes as the P-DATA below (one
            # PDU, one last-command PDV), without a pipe wake-up, a switch to the DUL
            # thread and its state-machine event and PDU encoding per stored image.
            wire = sendpath.Wire(*sendpath._one_pdu(context_id, encoded))
            if not sendpath.write_now(dul, wire):
                dul.send_pdu(wire)
            return
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, b"\x03" + encoded]]  # type: ignore[list-item]
        dul.send_pdu(primitive)


def nudge(assoc: Association) -> None:
    """Wake the association thread waiting on its DIMSE queue (it re-checks everything)."""
    condition = assoc.dimse.msg_queue.not_empty
    with condition:
        if isinstance(assoc, FastAssociation):
            assoc._pv_nudges += 1
        condition.notify_all()


def _trigger(assoc: Association, name: str) -> None:
    evt.trigger(assoc, getattr(evt, name), {})
