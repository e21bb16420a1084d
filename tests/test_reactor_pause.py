"""A thread that sends on an association and waits for the answer (a C-MOVE's
sub-operations: ``Association.send_c_store`` from the C-MOVE handler's thread) pauses the
association's own loop first. pynetdicom's loop raised its "paused" flag *before* waiting
at the checkpoint, so a sender could see the flag of a loop that had just passed the
checkpoint, send, and have its C-STORE-RSP taken off the queue by that loop ("Received
unexpected C-STORE service message"), then wait for the DIMSE timeout: a failed
sub-operation (CI, under load: ``test_send_fastpath_conformance``'s C-MOVE into
``storescp``). ``patches.safe_reactor_pause``: the loop looks at the checkpoint again.

Here that interleaving is forced: the requestor's loop is held right after passing the
checkpoint while the test sends, to a pynetdicom Storage SCP on loopback.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from pacsvault.dicom import patches

LOCAL = "127.0.0.1"


class _LateQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue, its blocking reader (the sender) scheduled late, as a
    loaded machine may: the answer sits in the queue a moment before the sender takes it."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(0.3)
        return super().get(block, timeout)


class _HeldCheckpoint(threading.Event):
    """The loop's checkpoint; once ``armed``, its next ``wait`` tells the test (``passed``)
    and returns only once the sender's answer is in ``queue``: the loop goes on from the
    checkpoint exactly then."""

    def __init__(self, queue: _LateQueue) -> None:
        super().__init__()
        self.set()
        self.armed = False
        self.passed = threading.Event()
        self._queue = queue

    def wait(self, timeout: float | None = None) -> bool:
        out = super().wait(timeout)
        if self.armed:
            self.armed = False
            self.passed.set()
            deadline = time.monotonic() + 5
            while not self._queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
        return out


def _instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "PAUSE-1", "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture
def scp() -> Iterator[int]:
    ae = AE(ae_title="PAUSESCP")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server((LOCAL, 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: 0x0000)])
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _send_while_the_loop_passes_its_checkpoint(port: int) -> Any:
    ae = AE(ae_title="PAUSESCU")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 5
    assoc = ae.associate(LOCAL, port, ae_title="PAUSESCP")
    assert assoc.is_established
    try:
        late = _LateQueue()
        assoc.dimse.msg_queue = late
        checkpoint = _HeldCheckpoint(late)
        assoc._reactor_checkpoint = checkpoint
        checkpoint.armed = True
        assert checkpoint.passed.wait(5)  # the loop is between the checkpoint and the queue
        return assoc.send_c_store(_instance())
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_sender_gets_its_own_answer_while_the_loop_passes_its_checkpoint(
        scp: int) -> None:
    patches.configure_pynetdicom()
    assert getattr(Association._run_reactor, "pv_safe_pause", False)
    status = _send_while_the_loop_passes_its_checkpoint(scp)
    assert "Status" in status and status.Status == 0x0000


def test_without_the_fix_the_loop_takes_the_answer(
        scp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same interleaving on pynetdicom's own loop: the answer is lost (what the test
    above guards against; if this one fails, the forced interleaving no longer shows it)."""
    patches.configure_pynetdicom()
    upstream = Association._run_reactor.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(Association, "_run_reactor", upstream)
    status = _send_while_the_loop_passes_its_checkpoint(scp)
    assert "Status" not in status  # the DIMSE timeout: no answer reached the sender


def test_an_idle_requestor_loop_is_paused_so_a_sender_goes_on_at_once(scp: int) -> None:
    """Issue 17: the requested association's loop spends its 1 ms idle period paused, so a
    sender (each sub-operation of a C-MOVE) that clears the checkpoint need not poll
    ``_is_paused`` until the loop's sleep ends; the sends still get their own answers."""
    patches.configure_pynetdicom()
    ae = AE(ae_title="PAUSESCU")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 5
    assoc = ae.associate(LOCAL, port=scp, ae_title="PAUSESCP")
    assert assoc.is_established
    try:
        time.sleep(0.05)
        seen = []
        for _ in range(200):
            seen.append(bool(assoc._is_paused))
            time.sleep(0.0005)
        # pynetdicom's loop slept with the flag down: seen paused ~never
        assert sum(seen) >= 0.9 * len(seen), sum(seen)
        for _ in range(20):
            status = assoc.send_c_store(_instance())
            assert status.Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
