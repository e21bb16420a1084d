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

from tests.helpers import Server, VaultDir, events, make_vault, start_server, storescu

CALLING = "MODALITY"
GIB = 1 << 30
MIB = 1 << 20
REFUSED = "dicom.connection.refused"

# Short deadlines so the test stays bounded; the defaults are in config.py.
SETTINGS = {
    "connect_timeout": "2.0",
    "association_timeout": "3.0",
    "pdu_timeout": "5.0",
    "network_timeout": "10.0",
    "refusal_report_seconds": "2.0",
}


def _configure(vault: VaultDir, section: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        vault.set_toml(section, key, value)


@pytest.fixture
def hardened(tmp_path: Path) -> Iterator[Server]:
    vault = make_vault(tmp_path / "vault")
    vault.add_node(CALLING)
    _configure(vault, "dicom", SETTINGS)
    srv = start_server(vault)
    yield srv
    srv.stop()


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


def _wait_for(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


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
    assert _wait_for(lambda: _refusals(server, "oversized-pdu"), 15)
    # first refusal at once, repeats from the same source counted in a summary
    assert _wait_for(
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
        started = time.monotonic()
        for _ in range(3):
            res = storescu(server.port, [ct], calling=CALLING, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "Local Limit Exceeded" not in res.stdout + res.stderr
        assert time.monotonic() - started < 30

        # The slow ones are cut once the association deadline (3 s here) has passed.
        time.sleep(4.0)
        cut = sum(_closed_by_server(sock, 3) for sock in held)
        assert cut == len(held), f"{len(held) - cut} slow connections still open"
    finally:
        for sock in held:
            sock.close()
    assert server.alive()
    assert _wait_for(lambda: _refusals(server, "deadline"), 15)
    assert _wait_for(lambda: _refusals(server, "per-source-limit"), 15)
    actions = {e["action"] for e in events(server.vault)}
    assert "dicom.store.association" in actions or any(
        a.startswith("dicom.store") for a in actions)  # type: ignore[union-attr]


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
    assert _wait_for(lambda: _refusals(server, "malformed-pdu"), 15)
    time.sleep(0.5)
    text = server.log()
    for line in text.splitlines():
        assert not line.lstrip().startswith("FAKE LINE"), line
    assert "Traceback" not in text
    # pynetdicom quotes the raw title in its own error line: escaped, with the peer
    assert "EVIL\\nFAKE LINE2" in text
