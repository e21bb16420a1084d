"""The DICOM listeners hold under a hostile host on the practice network (issue 11).

Each test replays one attack against the real server (a subprocess on loopback) and shows
the resource budget for unauthenticated bytes at work:

- defect 1: PDU headers announcing ~1 GiB before any association (plain and TLS port)
  leave the server's memory flat, the connections are cut and the refusal is recorded;
- defect 2: 200 slow connections ("slowloris") from many loopback addresses neither stop a
  registered modality from storing nor make it see "Local Limit Exceeded", and they are
  cut once the association deadline passes;
- defect 14: CR/LF in a calling AE title and malformed PDUs leave one escaped log line
  each, no forged line and no traceback;
- defect 15 (part): those refusals reach the audit trail, aggregated per source.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pydicom.data import get_testdata_file
from pynetdicom.tests import encoded_pdu_items as pdus

from tests.harness.served import served_vault
from tests.helpers import Server, events, storescu, wait_until

CALLING = "MODALITY"
GIB = 1 << 30
MIB = 1 << 20
REFUSED = "dicom.connection.refused"

# Short deadlines so the test stays bounded; the defaults are in config.py. One association
# slot in all: half-open connections must never take it; PDUs up to 64 KiB once associated.
SETTINGS = {
    "connect_timeout": "2.0",
    "association_timeout": "3.0",
    "pdu_timeout": "5.0",
    "network_timeout": "10.0",
    "refusal_report_seconds": "2.0",
    "max_associations": "1",
    "maximum_pdu_size": "65536",
}


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the whole file (starting one costs ~10 s here)."""
    with served_vault(tmp_path_factory.mktemp("hardening") / "vault",
                      nodes=[(CALLING, (), "127.0.0.1")],
                      settings={"dicom": SETTINGS}) as served:
        yield served.server


def _connect(port: int, source: str = "127.0.0.1", tls: bool = False) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                   source_address=(source, 0))
    if not tls:
        return raw
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an intruder without any certificate
    return ctx.wrap_socket(raw)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the server closed the connection (EOF or reset), reading what it sent."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def _rss(server: Server) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def _refusals(server: Server, reason: str) -> list[dict[str, object]]:
    return [e for e in events(server.vault, REFUSED) if e.get("reason") == reason]


# --- defect 1: memory before authentication -------------------------------------------


@pytest.mark.slow
def test_huge_pdu_announcements_leave_memory_flat(hardened: Server) -> None:
    server = hardened
    time.sleep(1.0)  # let start-up allocations settle
    before = _rss(server)
    header = struct.pack(">BBL", 0x01, 0x00, GIB)  # A-ASSOCIATE-RQ "of 1 GiB"
    socks = []
    for i in range(10):
        tls = i % 2 == 1
        sock = _connect(server.tls_port if tls else server.port, tls=tls)
        sock.sendall(header + b"\x00" * 64)
        socks.append(sock)
    time.sleep(2.0)
    peak = _rss(server)
    try:
        assert peak - before < 150 * MIB, f"RSS grew by {(peak - before) // MIB} MiB"
        for sock in socks:
            assert _closed_by_server(sock, 10), "an oversized PDU left its connection open"
    finally:
        for sock in socks:
            sock.close()
    assert server.alive()
    assert wait_until(lambda: _refusals(server, "oversized-pdu"), 15)
    # first refusal at once, repeats from the same source counted in a summary
    assert wait_until(
        lambda: sum(int(e["count"]) for e in _refusals(server, "oversized-pdu")) >= 10, 15)  # type: ignore[call-overload]
    # and the modality still stores
    ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    res = storescu(server.port, [ct], calling=CALLING)
    assert res.returncode == 0, res.stdout + res.stderr


# --- defect 2: slowloris --------------------------------------------------------------


@pytest.mark.slow
def test_slow_connections_do_not_lock_out_a_registered_modality(hardened: Server) -> None:
    server = hardened
    held: list[socket.socket] = []
    refused_at_once = 0
    # One source gets 8 connections at once; the ninth is closed at once.
    own = [socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                    source_address=("127.0.0.60", 0)) for _ in range(9)]
    try:
        assert _closed_by_server(own[-1], 1.5), "per-source cap not applied"
        assert not _closed_by_server(own[0], 0.2)
    finally:
        for sock in own:
            sock.close()
    try:
        # 200 slow connections, 8 from each of 25 loopback addresses: one byte each, then
        # silence (half on each port).
        for n in range(200):
            source = f"127.0.0.{2 + n // 8}"
            port = server.port if n % 2 == 0 else server.tls_port
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                                source_address=(source, 0))
                sock.sendall(b"\x01")
            except OSError:
                refused_at_once += 1
                continue
            held.append(sock)
        # The registered modality keeps storing meanwhile, never "Local Limit Exceeded".
        ct = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
        for _ in range(3):  # (refused or starved, storescu would fail here)
            res = storescu(server.port, [ct], calling=CALLING, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "Local Limit Exceeded" not in res.stdout + res.stderr

        # The slow ones are cut once the association deadline (3 s here) has passed.
        time.sleep(4.0)
        cut = sum(_closed_by_server(sock, 3) for sock in held)
        assert cut == len(held), f"{len(held) - cut} slow connections still open"
    finally:
        for sock in held:
            sock.close()
    assert server.alive()
    assert wait_until(lambda: _refusals(server, "deadline"), 15)
    assert wait_until(lambda: _refusals(server, "per-source-limit"), 15)
    actions = {e["action"] for e in events(server.vault)}
    assert "dicom.store.association" in actions or any(
        str(a).startswith("dicom.store") for a in actions)


@pytest.mark.slow
def test_a_tls_client_that_hangs_up_gives_its_slot_back_at_once(hardened: Server) -> None:
    """A completed TLS handshake followed by a hang-up (a scanner, a TLS probe such as
    ``pacsvault check``) must free the source's connection slot when the peer closes, not
    at the association deadline: eight of them used to lock the address out for it."""
    server = hardened
    for source, port, tls in (("127.0.0.230", server.tls_port, True),
                              ("127.0.0.231", server.port, False)):
        for _ in range(12):  # more than the 8 connections a source may hold
            sock = _connect(port, source=source, tls=tls)
            if not tls:
                sock.sendall(b"\x01")  # a byte: the connection reached the reactor
            sock.close()
        time.sleep(0.5)
        probe = _connect(port, source=source, tls=tls)
        try:
            # admitted: held open until a deadline (2-3 s here), not closed at once
            assert not _closed_by_server(probe, 1.0), f"slots of closed connections held ({port})"
        finally:
            probe.close()
        assert not [e for e in _refusals(server, "per-source-limit")
                    if source in (e.get("address"), e.get("actor_address"))]


# --- defect 14 and 15: log injection, malformed PDUs ----------------------------------


def _associate_rq(calling: bytes, called: bytes = b"PACSVAULT") -> bytes:
    pdu = bytearray(pdus.a_associate_rq)
    pdu[10:26] = called.ljust(16)
    pdu[26:42] = calling.ljust(16)
    return bytes(pdu)


def test_crlf_in_ae_title_and_malformed_pdus_stay_one_escaped_line(hardened: Server) -> None:
    server = hardened
    attacks = [
        _associate_rq(b"\r\nFAKE LINE"),                      # log injection via AE title
        _associate_rq(b"EVIL\nFAKE LINE2", b"\r\nFAKE LINE3"),
        b"\x01\x00" + struct.pack(">L", 32) + b"\xff" * 32,   # garbage A-ASSOCIATE-RQ body
        b"\x09\x00" + struct.pack(">L", 4) + b"abcd",          # unknown PDU type
        pdus.a_associate_rq[:6] + pdus.a_associate_rq[6:40],   # truncated then silence
        b"\x04\x00" + struct.pack(">L", 8) + b"\x00" * 8,     # P-DATA before association
    ]
    for raw in attacks:
        with contextlib.closing(_connect(server.port)) as sock:
            sock.sendall(raw)
            assert _closed_by_server(sock, 10)
    # and a garbage-only burst on the TLS port
    with contextlib.closing(_connect(server.tls_port, tls=True)) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 20) + b"\r\nFAKE LINE4\r\n\x00\x07abcde")
        assert _closed_by_server(sock, 10)
    assert server.alive()
    assert wait_until(lambda: _refusals(server, "malformed-pdu"), 15)
    # the repeats raise the connection-abuse alert (recorded as alert.sent/alert.failed)
    assert wait_until(lambda: any(
        e.get("rule") == "connection-abuse" for e in events(server.vault)
        if str(e["action"]).startswith("alert.")), 15)
    time.sleep(0.5)
    text = server.log()
    for line in text.splitlines():
        assert not line.lstrip().startswith("FAKE LINE"), line
    assert "Traceback" not in text
    # pynetdicom quotes the raw title in its own error line: escaped, with the peer
    assert "EVIL\\nFAKE LINE2" in text


# --- association slots and the negotiated PDU size ------------------------------------


def _associate(port: int) -> object:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="PACSVAULT")


def _associate_when_free(port: int) -> object:
    """The one slot is given back when the previous association's thread has ended."""
    deadline = time.monotonic() + 10
    while True:
        assoc = _associate(port)
        if assoc.is_established or time.monotonic() > deadline:  # type: ignore[attr-defined]
            return assoc
        time.sleep(0.2)


def test_local_limit_counts_associations_only_and_is_recorded(hardened: Server) -> None:
    server = hardened
    # half-open connections hold no association slot
    idle = [_connect(server.port, source=f"127.0.0.{70 + i}") for i in range(3)]
    try:
        first = _associate_when_free(server.port)
        assert first.is_established  # type: ignore[attr-defined]
        second = _associate(server.port)
        assert second.is_rejected  # type: ignore[attr-defined]
        first.release()  # type: ignore[attr-defined]
        assert wait_until(lambda: _refusals(server, "local-limit"), 10)
        third = _associate_when_free(server.port)
        assert third.is_established  # type: ignore[attr-defined]
        third.release()  # type: ignore[attr-defined]
    finally:
        for sock in idle:
            sock.close()


def test_pdu_over_the_negotiated_maximum_aborts_the_association(hardened: Server) -> None:
    server = hardened
    assoc = _associate_when_free(server.port)
    assert assoc.is_established  # type: ignore[attr-defined]
    before = _rss(server)
    raw = assoc.dul.socket.socket  # type: ignore[attr-defined]
    raw.sendall(struct.pack(">BBL", 0x04, 0x00, GIB) + b"\x00" * 64)  # P-DATA "of 1 GiB"
    assert wait_until(lambda: assoc.is_aborted, 10)  # type: ignore[attr-defined]
    assert _rss(server) - before < 100 * MIB
    assert wait_until(lambda: any(e.get("phase") == "pdu"
                                 for e in _refusals(server, "oversized-pdu")), 10)


# --- the pieces, in-process -----------------------------------------------------------


def test_log_lines_escape_control_characters_and_condense_exceptions() -> None:
    import logging

    from pacsvault.logsafe import OneLineFormatter, escape

    assert escape("a\r\nb\tc\x00\x1b[31m\u2028") == "a\\r\\nb\\tc\\x00\\x1b[31m\\u2028"
    formatter = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("bad\nFAKE LINE")
    except ValueError:
        import sys

        record = logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1,
                                   "decode of %s failed", ("AE\r\nFAKE",), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line
    assert line == ("ERROR pynetdicom.dul: decode of AE\\r\\nFAKE failed "
                    "[ValueError: bad\\nFAKE LINE]")


def test_refusals_are_recorded_first_then_summarised() -> None:
    from pacsvault.audit.events import AuditEvent, Recorder
    from pacsvault.audit.refusals import RefusalLog

    seen: list[AuditEvent] = []

    class Sink:
        def write(self, event: AuditEvent) -> None:
            seen.append(event)

    now = [0.0]
    log = RefusalLog(Recorder([Sink()]), interval=60, clock=lambda: now[0])
    for _ in range(100):
        log.refused("dicom", "10.0.0.9", "deadline", {"phase": "first-byte"})
    log.refused("dicom", "10.0.0.8", "deadline")
    assert [(e.actor_address, e.detail["count"]) for e in seen] == [
        ("10.0.0.9", 1), ("10.0.0.8", 1)]
    now[0] = 61.0
    log.flush()
    assert [(e.actor_address, e.detail["count"], e.detail.get("summary")) for e in seen[2:]] \
        == [("10.0.0.9", 99, True)]
    assert seen[2].action == "dicom.connection.refused"


def test_budget_per_source_pending_and_slots() -> None:
    from pacsvault.dicom.limits import ConnectionBudget, KnownHosts, Ticket, source_key

    # one practice LAN is one IPv6 /64: each address has its own budget
    assert source_key("2001:db8::1") != source_key("2001:db8::ffff")
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"
    known = KnownHosts(lambda: ["10.0.0.5"])
    known.refresh()
    budget = ConnectionBudget(per_source=2, pending=3, associations=1, known=known)
    a = [budget.admit("10.0.0.1") for _ in range(3)]
    assert isinstance(a[0], Ticket) and isinstance(a[1], Ticket)
    assert a[2] == "per-source-limit"
    assert isinstance(budget.admit("10.0.0.2"), Ticket)
    assert budget.admit("10.0.0.3") == "busy"  # 3 pending already
    modality = budget.admit("10.0.0.5")  # a registered node's host still gets in
    assert isinstance(modality, Ticket)
    assert budget.associate(modality) and not budget.associate(a[0])  # one slot
    budget.release(modality)
    budget.release(modality)  # idempotent
    assert budget.associate(a[0])
    assert budget.counts == (2, 1)
    # a registered modality may open as many connections as there are association slots
    # (several associations, and slots given back a few ms after the peer moved on)
    wide = ConnectionBudget(per_source=2, pending=64, associations=6, known=known)
    tickets = [wide.admit("10.0.0.5") for _ in range(7)]
    assert all(isinstance(t, Ticket) for t in tickets[:6]) and tickets[6] == "per-source-limit"
    assert [wide.admit("10.0.0.1") for _ in range(3)][2] == "per-source-limit"


def test_floods_of_one_by_one_events_are_counted_past_a_burst() -> None:
    from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder
    from pacsvault.audit.refusals import BurstRecorder, RefusalLog

    seen: list[AuditEvent] = []

    class Sink:
        def write(self, event: AuditEvent) -> None:
            seen.append(event)

    now = [0.0]
    refusals = RefusalLog(Recorder([Sink()]), interval=60, clock=lambda: now[0])
    bursty = BurstRecorder(Recorder([Sink()]), refusals)
    for _ in range(1000):  # e.g. a loop of TLS garbage or unknown AE titles
        bursty.emit(AuditEvent(action="dicom.association.rejected",
                               outcome=Outcome.MINOR_FAILURE, code=EventCode.SECURITY_ALERT,
                               actor_ae="X", actor_address="10.0.0.7"))
    assert len(seen) == 60
    now[0] = 61.0
    refusals.flush()
    assert len(seen) == 61
    assert seen[-1].action == "dicom.association.rejected"
    assert seen[-1].detail == {"summary": True, "count": 940}
