"""The HTTPS listener's request parser (httptools, issue 17) keeps the limits h11 had: a
request line and headers over ``MAX_HEAD`` are answered 431 and the connection closed,
whether the head ends or keeps coming (never gathered without bound), and recorded as a
refusal; a head under it, a body of any size after a small head, several requests on one
kept-alive connection and pipelined requests are served as before; the header deadline
applies between kept-alive requests too."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from pacsvault.web.limits import MAX_HEAD
from tests.helpers import Server, events, make_vault, start_server, wait_until

REFUSED = "web.connection.refused"
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    vault = make_vault(tmp_path_factory.mktemp("head") / "vault")
    vault.set_toml("web", "header_timeout", str(HEADER_TIMEOUT))
    vault.set_toml("dicom", "refusal_report_seconds", "1.0")
    srv = start_server(vault)
    yield srv
    srv.stop()


def _tls(port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw)


def _read_all(sock: ssl.SSLSocket, within: float = 10.0) -> bytes:
    """Everything until the server closes (or ``within`` passes)."""
    data = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _responses(sock: ssl.SSLSocket, count: int, within: float = 10.0) -> list[int]:
    """The status codes of the next ``count`` responses on a kept-alive connection."""
    data = b""
    statuses: list[int] = []
    deadline = time.monotonic() + within
    while len(statuses) < count and time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        while b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                break
            statuses.append(int(head.split(b" ", 2)[1]))
            data = rest[length:]
    return statuses


def _get(path: str = "/login", extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\n".encode() + extra + b"\r\n")


def _refusals(server: Server) -> list[dict[str, object]]:
    return [e for e in events(server.vault, REFUSED) if e.get("reason") == "headers-too-large"]


def test_a_head_over_the_limit_is_refused_and_recorded(web: Server) -> None:
    port = web.https_port
    with _tls(port) as sock:
        sock.sendall(_get(extra=b"X-Big: " + b"a" * (MAX_HEAD + 100) + b"\r\n"))
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    # a head that never ends is refused once it passes the limit, not gathered on
    with _tls(port) as sock:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        sent = 0
        answer = b""
        while sent < 4 * MAX_HEAD and not answer:
            try:
                sock.sendall(b"b" * 4096)
            except (ConnectionError, ssl.SSLError, OSError):
                break
            sent += 4096
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
        answer += _read_all(sock, 5.0)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert sent <= 2 * MAX_HEAD + 65536
    assert wait_until(lambda: _refusals(web), 15)
    assert web.alive()


def test_heads_under_the_limit_bodies_and_kept_alive_requests_are_served(
        web: Server) -> None:
    port = web.https_port
    with _tls(port) as sock:
        # a head just under the limit, then two more requests on the same connection
        sock.sendall(_get(extra=b"X-Big: " + b"a" * (MAX_HEAD - 400) + b"\r\n"))
        assert _responses(sock, 1) == [200]
        sock.sendall(_get())
        assert _responses(sock, 1) == [200]
        # a body far over the head's limit right behind a small head, in one write
        body = b"x" * (4 * MAX_HEAD)
        sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/dicom\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = _responses(sock, 1)
        assert status and status[0] in (401, 403, 415), status  # refused for who, not size
        # pipelined: three requests in one write, three answers in order
        sock.sendall(_get() * 3)
        assert _responses(sock, 3) == [200, 200, 200]


def test_the_header_deadline_applies_between_kept_alive_requests(web: Server) -> None:
    with _tls(web.https_port) as sock:
        sock.sendall(_get())
        assert _responses(sock, 1) == [200]
        sock.sendall(b"GET /login HTTP/1.1\r\n")  # a second head that never ends
        start = time.monotonic()
        _read_all(sock, HEADER_TIMEOUT + 10)
        assert time.monotonic() - start < HEADER_TIMEOUT + 4  # cut, not kept
    assert web.alive()
