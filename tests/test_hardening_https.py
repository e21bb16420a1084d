"""The HTTPS listener holds under slow clients (issue 11, the HTTPS side of the budget).

200 slow HTTPS connections from one address (headers sent a few bytes at a time) neither
stop the sign-in page answering another machine nor survive their header deadline; a slow
body and a TLS handshake that never finishes are cut too; the refusals are in the trail.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, events, make_vault, start_server, wait_until
from tests.web_helpers import client

REFUSED = "web.connection.refused"
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Server]:
    vault = make_vault(tmp_path / "vault")
    vault.set_toml("web", "header_timeout", str(HEADER_TIMEOUT))
    vault.set_toml("web", "body_timeout", str(BODY_TIMEOUT))
    vault.set_toml("dicom", "refusal_report_seconds", "2.0")
    srv = start_server(vault)
    yield srv
    srv.stop()


def _tls(port: int, source: str) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
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


def _refusals(server: Server, reason: str) -> list[dict[str, object]]:
    return [e for e in events(server.vault, REFUSED) if e.get("reason") == reason]


@pytest.mark.slow
def test_slow_https_clients_are_cut_and_do_not_lock_others_out(web: Server) -> None:
    server = web
    port = server.https_port
    ca = server.vault.data / "tls" / "ca.crt"
    slow: list[socket.socket] = []
    try:
        for _ in range(200):
            try:
                sock: socket.socket = _tls(port, "127.0.0.1")
                sock.sendall(b"GET /login HTTP/1.1\r\nHo")
            except OSError:
                continue  # refused at once (over this source's budget)
            slow.append(sock)
        assert len(slow) >= 1
        # another machine of the practice still signs in
        started = time.monotonic()
        with client(port, ca, local_address="127.0.0.2") as http:
            res = http.get("/login")
        assert res.status_code == 200
        assert time.monotonic() - started < 10
        # a slow body and a handshake that never comes
        body = _tls(port, "127.0.0.3")
        body.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nu=")
        bare = socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=("127.0.0.4", 0))
        with contextlib.closing(body), contextlib.closing(bare):
            # every slow connection is gone once the header deadline has passed
            time.sleep(HEADER_TIMEOUT + 1.0)
            still = sum(not _closed_by_server(s, 0.5) for s in slow)
            assert still == 0, f"{still} slow-header connections still open"
            assert _closed_by_server(bare, 3.0), "an unfinished TLS handshake was kept"
            assert _closed_by_server(body, BODY_TIMEOUT + 3.0), "a slow body was kept"
    finally:
        for sock in slow:
            sock.close()
    assert server.alive()
    assert wait_until(lambda: _refusals(server, "deadline"), 15)
    assert wait_until(lambda: _refusals(server, "per-source-limit"), 15)
    deadlines = _refusals(server, "deadline")
    assert {e.get("phase") for e in deadlines} >= {"headers", "body"}
    # the first refusal at once, the repeats as one summary with their count
    assert wait_until(lambda: any(e.get("summary") for e in _refusals(server, "per-source-limit")),
                     15)
    with client(port, ca, local_address="127.0.0.1") as http:
        assert http.get("/login").status_code == 200
