"""Malformed and unusual HTTP requests get a clear answer and harm nothing (issue 17 moved the
HTTPS listener's parser from h11 to httptools/llhttp; these are the cases h11 refused).

Each request goes over TLS to a real server, one connection each: request smuggling
(Content-Length beside Transfer-Encoding, two Content-Lengths), broken chunking, bytes a
header may not hold, a method that is none, an oversized or negative length are answered
400 and closed; an oversized URL or too many headers 431; an upload without credentials is
refused for who sends it (401), chunked or announced with ``Expect: 100-continue``, never
read as another request; an Upgrade (WebSocket, h2c) is ignored and the request served as
HTTP/1.1. Afterwards the server is alive and answers an ordinary request on a kept-alive
connection.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.helpers import Server, make_vault, start_server
from tests.test_web_head_limit import _get, _read_all, _responses, _tls

H = b"Host: localhost\r\n"
STOW = b"POST /dicom-web/studies HTTP/1.1\r\n" + H
CLOSE = b"Connection: close\r\n"

# request -> the statuses answered, in order, before the server closes the connection
CASES: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "content-length-and-chunked": (
        STOW + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    "two-content-lengths": (STOW + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcd", (400,)),
    "bad-chunk-size": (STOW + b"Transfer-Encoding: chunked\r\n"
                       b"Content-Type: application/dicom\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", (400,)),
    "huge-content-length": (STOW + b"Content-Length: 99999999999999999999\r\n\r\n", (400,)),
    "negative-content-length": (STOW + b"Content-Length: -1\r\n\r\n", (400,)),
    "nul-in-header": (b"GET /login HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", (400,)),
    "bare-line-feeds": (b"GET /login HTTP/1.1\nHost: localhost\n\n", (400,)),
    "folded-header": (b"GET /login HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", (400,)),
    "space-before-colon": (b"GET /login HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", (400,)),
    "non-ascii-header-name": ("GET /login HTTP/1.1\r\nHost: localhost\r\nX-é: a\r\n\r\n"
                              .encode(), (400,)),
    "not-a-method": (b"G@T /login HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "connect": (b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "url-over-the-head-limit": (b"GET /login?" + b"a" * 20000 + b" HTTP/1.1\r\n" + H
                                + b"\r\n", (431,)),
    "two-thousand-headers": (b"GET /login HTTP/1.1\r\n" + H
                             + b"".join(b"X-%d: 1\r\n" % i for i in range(2000)) + b"\r\n",
                             (431,)),
    "upload-expecting-100-continue": (
        STOW + b"Content-Type: application/dicom\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n" + CLOSE + b"\r\n", (401,)),
    "chunked-upload": (STOW + b"Transfer-Encoding: chunked\r\nContent-Type: application/dicom"
                       b"\r\n" + CLOSE + b"\r\n3\r\nabc\r\n0\r\n\r\n", (401,)),
    "websocket-upgrade": (b"GET /login HTTP/1.1\r\n" + H + b"Connection: Upgrade, close\r\n"
                          b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n", (200,)),
    "h2c-upgrade": (b"GET /login HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings, "
                    b"close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                    (200,)),
    "non-ascii-header-value": ("GET /login HTTP/1.1\r\nHost: localhost\r\nX-A: é\r\n"
                               "Connection: close\r\n\r\n".encode(), (200,)),
}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    vault = make_vault(tmp_path_factory.mktemp("malformed") / "vault")
    srv = start_server(vault)
    yield srv
    srv.stop()


_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.1 (\d{3}) ")


def _statuses(data: bytes) -> tuple[int, ...]:
    """The status codes of the responses in ``data`` (bodies here hold no status line)."""
    return tuple(int(m.group(1)) for m in _STATUS.finditer(data))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_or_unusual_request_gets_a_clear_answer(web: Server, case: str) -> None:
    request, status = CASES[case]
    with _tls(web.https_port) as sock:
        sock.sendall(request)
        answer = _read_all(sock)  # until the server closes
    assert _statuses(answer) == status, answer[:200]


def test_garbage_behind_a_request_is_refused_and_closes(web: Server) -> None:
    """A valid request with bytes behind it that begin no request: the request may be
    answered first (if the parser got it alone), the garbage is 400 and the end."""
    with _tls(web.https_port) as sock:
        sock.sendall(_get() + b"\x16\x03\x01garbage\r\n\r\n")
        answer = _read_all(sock)
    assert _statuses(answer) in ((400,), (200, 400)), answer[:200]


def test_the_server_serves_on_after_them(web: Server) -> None:
    for request, _ in CASES.values():  # (again, if this test runs alone)
        with _tls(web.https_port) as sock:
            sock.sendall(request)
            _read_all(sock)
    with _tls(web.https_port) as sock:
        sock.sendall(_get())
        assert _responses(sock, 1) == [200]
        sock.sendall(_get())
        assert _responses(sock, 1) == [200]
    assert web.alive()
