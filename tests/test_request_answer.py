"""A peer that answers an association request at once (pacsvault rejecting an unknown AE
title does) can have its answer read, and the connection closed, by the requestor's DUL
thread before the requesting thread looks at the connection. pynetdicom's requestor takes
"not connected" at that moment as "could not connect" and aborts: the rejection was
reported as an abort with no answer (CI, under load:
``test_audit_trail.py::test_server_and_cli_append_concurrently``, 1 of 15 associations).
``patches.safe_request_answer``: a queued answer is read.

Here that interleaving is forced: the requesting thread is held in its ``EVT_REQUESTED``
handler (called between sending the request and looking at the connection) until the DUL
thread has closed the connection, against a pynetdicom acceptor on loopback.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsvault.dicom import patches

LOCAL = "127.0.0.1"


@pytest.fixture(autouse=True)
def _ours() -> None:
    patches.configure_pynetdicom()


@pytest.fixture
def scp() -> Iterator[int]:
    """A Verification SCP that accepts only the calling AE title ``FRIEND``."""
    ae = AE(ae_title="SCP")
    ae.add_supported_context(Verification)
    ae.require_calling_aet = ["FRIEND"]
    server = ae.start_server((LOCAL, 0), block=False)
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _associate(port: int, calling: str, *, hold: bool) -> Any:
    """Associate; with ``hold``, the requesting thread waits in ``EVT_REQUESTED`` until the
    connection is closed (the answer read by the DUL thread, or the attempt failed)."""
    closed = threading.Event()
    handlers: list[Any] = [(evt.EVT_CONN_CLOSE, lambda _e: closed.set())]
    if hold:
        handlers.append((evt.EVT_REQUESTED, lambda _e: closed.wait(10)))
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    assoc = ae.associate(LOCAL, port, ae_title="SCP", evt_handlers=handlers)
    if hold:
        assert closed.is_set(), "the interleaving was not forced"
    return assoc


def test_upstream_reports_a_quick_rejection_as_an_abort(
        scp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the forcing meaningful: on pynetdicom's own requestor it loses the answer."""
    upstream = ACSE._negotiate_as_requestor.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(ACSE, "_negotiate_as_requestor", upstream)
    assoc = _associate(scp, "STRANGER", hold=True)
    assert assoc.is_aborted and not assoc.is_rejected
    assert assoc.acceptor.primitive is None


def test_a_quick_rejection_is_reported_as_a_rejection(scp: int) -> None:
    assert getattr(ACSE._negotiate_as_requestor, "pv_quick_answer", False)
    assoc = _associate(scp, "STRANGER", hold=True)
    assert assoc.is_rejected and not assoc.is_aborted and not assoc.is_established
    rsp = assoc.acceptor.primitive
    assert (rsp.result, rsp.diagnostic) == (0x01, 0x03)  # permanent, calling AE not recognised


def test_a_failed_connection_is_still_an_abort() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((LOCAL, 0))
        port = probe.getsockname()[1]
    assoc = _associate(port, "FRIEND", hold=True)
    assert assoc.is_aborted and not assoc.is_rejected and not assoc.is_established


def test_accepted_and_unheld_associations_unchanged(scp: int) -> None:
    assoc = _associate(scp, "FRIEND", hold=False)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert _associate(scp, "STRANGER", hold=False).is_rejected
