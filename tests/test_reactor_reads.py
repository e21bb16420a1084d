"""The association's socket calls (issue 17). Reads (``dicom/reactor.BulkSocket.read_within``):
bytes that have arrived are read straight from the descriptor, without setting the socket's
timeout (each set or restore is a system call, and a point where another thread takes the
GIL); a read that has to wait still honours its deadline and leaves the idle timeout as it
was; a socket the DUL's wait saw readable is not polled again. Writes
(``dicom/sendpath._send_gathered``): straight to the descriptor while the kernel takes
them, every byte in order when its buffer fills.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pacsvault.dicom.reactor import BulkSocket
from tests.helpers import slow_reader

IDLE = 30.0


class _Counting(socket.socket):
    """A socket that counts ``settimeout`` calls (Python's own class otherwise)."""

    timeouts_set = 0

    def settimeout(self, value: float | None) -> None:
        type(self).timeouts_set += 1
        super().settimeout(value)


Pair = tuple[BulkSocket, _Counting, socket.socket]


@pytest.fixture()
def pair() -> Iterator[Pair]:
    """(the reading ``BulkSocket``, its counting socket, the peer's socket)."""
    ours, peer = socket.socketpair()
    counting = _Counting(ours.family, ours.type, fileno=ours.detach())
    counting.settimeout(IDLE)  # as ``run_reactor`` leaves it: the idle timeout
    _Counting.timeouts_set = 0
    bulk = BulkSocket.__new__(BulkSocket)
    bulk.socket = counting
    yield bulk, counting, peer
    counting.close()
    peer.close()


def test_bytes_already_arrived_are_read_without_touching_the_timeout(pair: Pair) -> None:
    bulk, counting, peer = pair
    peer.sendall(b"\x04\x00\x00\x00\x00\x0a" + bytes(range(10)))
    header = bulk.read_within(6, time.monotonic() + 5)
    body = bulk.read_within(10, time.monotonic() + 5, prefix=header)
    assert bytes(body) == b"\x04\x00\x00\x00\x00\x0a" + bytes(range(10))
    assert _Counting.timeouts_set == 0  # the old path set and restored it per read
    assert counting.gettimeout() == IDLE


def test_a_read_that_waits_gets_the_rest_and_restores_the_idle_timeout(pair: Pair) -> None:
    bulk, counting, peer = pair
    peer.sendall(b"abc")

    def rest() -> None:
        time.sleep(0.2)
        peer.sendall(b"defgh")

    sender = threading.Thread(target=rest)
    sender.start()
    try:
        got = bulk.read_within(8, time.monotonic() + 5)
    finally:
        sender.join()
    assert bytes(got) == b"abcdefgh"
    assert _Counting.timeouts_set >= 2  # the deadline set for the wait, then restored
    assert counting.gettimeout() == IDLE


def test_the_deadline_still_holds_when_the_rest_never_comes(pair: Pair) -> None:
    bulk, counting, peer = pair
    peer.sendall(b"abc")  # 3 of the 8 announced: read at once, then the wait
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        bulk.read_within(8, began + 0.3)
    assert 0.25 <= time.monotonic() - began < 5
    assert counting.gettimeout() == IDLE


def test_a_peer_that_closes_mid_read_gives_what_arrived(pair: Pair) -> None:
    bulk, _, peer = pair
    peer.sendall(b"abcd")
    peer.shutdown(socket.SHUT_WR)
    assert bytes(bulk.read_within(8, time.monotonic() + 5)) == b"abcd"


def test_a_large_read_arriving_in_pieces_is_whole_and_in_order(pair: Pair) -> None:
    bulk, _, peer = pair
    payload = bytes(i % 251 for i in range(3 * 1024 * 1024))

    def send() -> None:
        for i in range(0, len(payload), 100_000):
            peer.sendall(payload[i:i + 100_000])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = bulk.read_within(len(payload), time.monotonic() + 30, earn=True)
    finally:
        sender.join()
    assert bytes(got) == payload



class _Socket:
    """What ``_is_transport_event`` looks at: connected, and whether it polls."""

    _is_connected = True
    polls = 0

    @property
    def ready(self) -> bool:
        type(self).polls += 1
        return True


class _State:
    current_state = "Sta6"


def test_a_socket_seen_readable_by_the_wait_is_read_without_polling_it_again() -> None:
    from pacsvault.dicom.reactor import WakeableDUL

    dul = WakeableDUL.__new__(WakeableDUL)
    reads: list[int] = []
    dul.socket = _Socket()  # type: ignore[assignment]
    dul.state_machine = _State()  # type: ignore[assignment]
    dul._read_pdu_data = lambda: reads.append(1)  # type: ignore[method-assign]
    dul._pv_readable = True  # (``_pv_wait``'s select saw it)
    assert dul._is_transport_event() and reads == [1] and _Socket.polls == 0
    # the flag is spent: the next look polls as pynetdicom's does
    assert dul._is_transport_event() and reads == [1, 1] and _Socket.polls == 1
    # closed meanwhile, or closing (Sta13): pynetdicom's own checks decide
    dul._pv_readable, _Socket._is_connected = True, False
    dul._is_transport_event()
    assert _Socket.polls == 2


def test_gathered_writes_straight_to_the_descriptor_resume_and_keep_the_order() -> None:
    """``sendpath._send_gathered`` on a real socket with a timeout: ``writev`` while the
    kernel takes the bytes, the socket's timed send when its buffer is full, resumed
    mid-piece either way: the peer gets every byte, in order."""
    from pacsvault.dicom import sendpath

    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(IDLE)
    payload = bytes(i % 253 for i in range(2 * 1024 * 1024 + 7))
    cuts = [0, 1, 12, 5000, 70_000, 700_001, len(payload)]
    view = memoryview(payload)
    pieces: list[bytes | memoryview] = [view[a:b] for a, b in itertools.pairwise(cuts)]
    try:
        with slow_reader(peer, len(payload)) as got:
            sendpath._send_gathered(ours, pieces)
    finally:
        ours.close()
        peer.close()
    assert bytes(got) == payload
    assert ours.gettimeout() == IDLE
