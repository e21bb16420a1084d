"""A TLS association's socket (issue 17): ``reactor.run_reactor`` sets its timeout once, to a
short slice, and its reads (``BulkSocket.read_within``) and writes (``sendpath.send_tls``)
look at their own deadlines between slices, instead of setting the socket's timeout around
each read (two ``ioctl`` calls each, ~57 per received CT slice). What must hold: every
byte, in order, whatever pieces the records arrive in; the deadline still cuts a peer that
stops mid-PDU (exactly: the last slice is what remains) or stops reading; the timeout is
not set while bytes flow.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from pacsvault.crypto.tls import TlsPaths, create_authority
from pacsvault.crypto.tls_context import client_context, server_context
from pacsvault.dicom import sendpath
from pacsvault.dicom.reactor import BulkSocket
from tests.helpers import slow_reader

_PASSWORD = b"reactor-tls-test"


class _CountingTLS(ssl.SSLSocket):
    """Python's TLS socket, counting ``settimeout`` calls made after the test began."""

    timeouts_set = 0

    def settimeout(self, value: float | None) -> None:
        type(self).timeouts_set += 1
        super().settimeout(value)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts as a vault makes them (its CA, its hardened suites, the
    client presenting the vault's own client certificate: mutual TLS)."""
    paths = TlsPaths(tmp_path_factory.mktemp("tls") / "tls")
    create_authority(paths, _PASSWORD, "TEST")
    server = server_context(paths, _PASSWORD)
    server.sslsocket_class = _CountingTLS
    return server, client_context(paths, _PASSWORD)


Pair = tuple[BulkSocket, ssl.SSLSocket, ssl.SSLSocket]


@pytest.fixture()
def pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[Pair]:
    """(the reading ``BulkSocket`` over the server side, its timeout the slice
    ``run_reactor`` sets; that TLS socket; the peer's TLS socket)."""
    server_ctx, client_ctx = contexts
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    box: dict[str, ssl.SSLSocket] = {}
    handshake = threading.Thread(
        target=lambda: box.setdefault("ours", server_ctx.wrap_socket(a, server_side=True)))
    handshake.start()
    peer = client_ctx.wrap_socket(b, server_hostname="localhost")
    handshake.join(timeout=10)
    ours = box["ours"]
    ours.settimeout(sendpath.TLS_SLICE)  # as ``run_reactor`` leaves it
    _CountingTLS.timeouts_set = 0
    bulk = BulkSocket.__new__(BulkSocket)
    bulk.socket = ours
    bulk.pv_wait_limit = 5.0
    yield bulk, ours, peer
    ours.close()
    peer.close()


def test_a_pdu_in_pieces_is_read_whole_in_order_without_setting_the_timeout(pair: Pair) -> None:
    bulk, ours, peer = pair
    body = bytes(i % 251 for i in range(200_000))
    pdu = b"\x04\x00" + len(body).to_bytes(4, "big") + body

    def send() -> None:
        for i in range(0, len(pdu), 7_001):  # records cut anywhere, with pauses
            peer.sendall(pdu[i:i + 7_001])
            if i % 5 == 0:
                time.sleep(0.001)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        header = bulk.read_within(6, time.monotonic() + 10)
        got = bulk.read_within(len(body), time.monotonic() + 10, prefix=header)
    finally:
        sender.join()
    assert bytes(got) == pdu
    assert _CountingTLS.timeouts_set == 0  # the old path set and restored it per read
    assert ours.gettimeout() == sendpath.TLS_SLICE


def test_the_deadline_still_cuts_a_peer_that_stops_mid_pdu(pair: Pair) -> None:
    bulk, ours, peer = pair
    peer.sendall(b"abc")  # 3 of the 8 announced
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        bulk.read_within(8, began + 0.3)
    assert 0.25 <= time.monotonic() - began < 5
    assert ours.gettimeout() == sendpath.TLS_SLICE


def test_a_deadline_several_slices_away_cuts_on_time_not_on_a_slice(pair: Pair) -> None:
    bulk, ours, peer = pair
    ours.settimeout(0.1)
    peer.sendall(b"abc")
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        bulk.read_within(8, began + 0.35)
    assert 0.33 <= time.monotonic() - began < 2
    assert ours.gettimeout() == 0.1  # the slice, restored after the last one


def test_a_peer_that_closes_mid_read_gives_what_arrived(pair: Pair) -> None:
    bulk, _, peer = pair
    peer.sendall(b"abcd")
    peer.close()
    assert bytes(bulk.read_within(8, time.monotonic() + 5)) == b"abcd"


def test_writes_wait_for_a_slow_reader_and_arrive_whole(pair: Pair) -> None:
    _, ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(i % 253 for i in range(3 * 1024 * 1024 + 5))
    with slow_reader(peer, len(payload)) as got:
        sendpath._send_joined(ours, [payload[:10], memoryview(payload)[10:]], 5.0)
    assert bytes(got) == payload
    assert _CountingTLS.timeouts_set == 0
    assert ours.gettimeout() == sendpath.TLS_SLICE


def test_a_peer_that_stops_reading_is_cut_after_the_wait_limit(pair: Pair) -> None:
    _, ours, _ = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(0.05)  # a short slice: the limit decides, not the slice
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        sendpath.send_tls(ours, bytes(8 * 1024 * 1024), 0.3)  # nobody reads
    assert 0.25 <= time.monotonic() - began < 10


def test_the_association_send_reports_a_closed_peer_as_pynetdicom_does(pair: Pair) -> None:
    """``BulkSocket.send`` on the sliced socket: sent bytes arrive; a failed
    write becomes Evt17 (transport closed), as ``AssociationSocket.send`` makes it."""
    import queue

    bulk, _, peer = pair

    events: queue.Queue[str] = queue.Queue()

    class _DUL:
        event_queue = events

    class _Assoc:
        dul = _DUL()

        def get_handlers(self, event: object) -> list[object]:
            return []

    bulk._assoc = _Assoc()  # type: ignore[assignment]
    bulk.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert peer.recv(64) == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert events.empty()
    peer.close()
    for _ in range(50):  # a write after the peer closed fails, sooner or later
        bulk.send(bytes(65536))
        if not events.empty():
            break
        select.select([], [], [], 0.01)
    assert events.get_nowait() == "Evt17"
