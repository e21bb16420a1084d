"""Run the web application over HTTPS with the vault's hardened TLS context.

uvicorn serves the app from a socket we bind ourselves (port 0 works for tests) and with
our ``SSLContext`` (TLS 1.2/1.3, forward-secret AEAD suites only): never plain HTTP.
Connections go through ``web.limits`` (per-source and total caps, header and body
deadlines); the TLS handshake has the header deadline too. uvicorn's own log lines go to
the process's handler (one escaped line each, ``logsafe``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from pacsvault.audit.refusals import RefusalLog
from pacsvault.proxyproto import ProxyHeaderError
from pacsvault.proxyproto import parse as parse_proxy_header
from pacsvault.web.limits import RefusalHook, WebLimits, guarded_protocol

STARTUP_TIMEOUT = 20.0


class WebService:
    def __init__(self, app: FastAPI, tls: ssl.SSLContext, limits: WebLimits | None = None,
                 refusals: RefusalLog | None = None,
                 balancer: Callable[[str], bool] | None = None) -> None:
        # ``balancer``: is this source a load balancer that sends a PROXY header
        # (``Settings.is_balancer``)? Its connections then name their client by it.
        self._balancer = balancer
        self._app = app
        self._tls = tls
        self._limits = limits or WebLimits()
        self._refusals = refusals
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, bind: str, port: int, socks: list[socket.socket] | None = None) -> int:
        """Serve on ``bind``:``port`` (``bind = "private"``: one socket per private address,
        ``service.bind``); or, with ``socks``, on those listening sockets (bound by
        ``serve --workers``'s parent and shared by the workers: ``listening_socket``)."""
        if not socks:
            socks = listening_sockets(bind, port)
        bound = int(socks[0].getsockname()[1])
        limits = self._limits
        refusals = self._refusals

        def refused(address: str, reason: str, detail: dict[str, str | int | bool]) -> None:
            if refusals is not None:
                refusals.refused("web", address, reason, detail)

        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, server_header=False,
            date_header=False, proxy_headers=False, lifespan="off", log_config=None,
            http=guarded_protocol(limits, refused),
        )
        config.load()
        config.ssl = self._tls  # our context, not uvicorn's defaults
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: _run(server, socks, limits.header_timeout,
                                _Proxy(self._balancer, refused)), name="https",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started and time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTPS listener failed to start")
            time.sleep(0.02)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


def listening_sockets(bind: str, port: int) -> list[socket.socket]:
    """One listening socket per address of ``bind`` (``service.bind.addresses``), all on
    the same port (port 0: the one the first socket got)."""
    from pacsvault.service.bind import addresses

    socks: list[socket.socket] = []
    try:
        for address in addresses(bind):
            socks.append(listening_socket(address, port))
            port = int(socks[0].getsockname()[1])
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def listening_socket(bind: str, port: int) -> socket.socket:
    """The HTTPS listening socket (also what ``serve --workers``'s parent binds)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by accepted sockets: small responses are not held ~40 ms by Nagle
    # (a viewer makes one request per frame).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((bind, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class _Proxy:
    """The PROXY protocol on the HTTPS listener: which sources must send a header, and
    where a missing or malformed one is recorded."""

    def __init__(self, balancer: Callable[[str], bool] | None, refused: RefusalHook) -> None:
        self.balancer, self.refused = balancer, refused


def _run(server: uvicorn.Server, socks: list[socket.socket], handshake_timeout: float,
         proxy: _Proxy | None = None) -> None:
    """``asyncio.run(server.serve(...))`` with a TLS handshake deadline.

    uvicorn creates its server without ``ssl_handshake_timeout`` (asyncio's default is
    60 s): a client that never finishes its handshake would hold a connection that long,
    before our protocol (and its budget) even sees it.
    """

    def loop_factory() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        create_server = loop.create_server

        async def with_deadline(*args: Any, **kwargs: Any) -> asyncio.Server:
            tls = kwargs.pop("ssl", None)
            if tls is not None:  # TLS is started by _Sniffer once the first bytes say so
                factory = args[0]
                args = (lambda: _Sniffer(loop, factory, tls, handshake_timeout, proxy),
                        *args[1:])
            return await create_server(*args, **kwargs)

        loop.create_server = with_deadline  # type: ignore[method-assign]
        return loop

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve(sockets=list(socks)))


# First bytes of a TLS connection: a handshake record (content type 22).
_TLS_RECORD = 0x16
_SAFE_HOST = re.compile(rb"^[A-Za-z0-9.:\[\]-]{1,255}$")


def plain_http_answer(first: bytes) -> bytes:
    """A short plain-HTTP 400 for a browser that typed http:// to the HTTPS port (issue 12,
    defect 8: it used to get an empty response). Names the https:// address when the Host
    header is a plain host[:port]; nothing else of the request is echoed."""
    host = b""
    for line in first.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host" and _SAFE_HOST.match(value.strip()):
            host = value.strip()
            break
    where = b"https://" + host + b"/" if host else b"https:// (not http://)"
    body = (b"This port speaks HTTPS only. Open " + where + b" instead.\n")
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n"
            b"\r\n" + body)


class _Sniffer(asyncio.Protocol):
    """Looks at the first bytes of a connection before any TLS: a TLS handshake goes on to
    asyncio's own TLS layer (same context, same handshake deadline, then uvicorn's protocol);
    anything else gets ``plain_http_answer`` and is closed. The deadline to the first byte
    is the handshake deadline.

    From a load balancer (``proxy``), a PROXY header comes first, within the same deadline:
    required (missing or malformed: recorded, closed), its client then given to uvicorn's
    protocol as the connection's client (``GuardedHttpProtocol.pv_client``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Any, tls: ssl.SSLContext,
                 timeout: float, proxy: _Proxy | None = None) -> None:
        self._loop, self._factory, self._tls, self._timeout = loop, factory, tls, timeout
        self._transport: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._proxy = proxy
        self._header: bytes | None = None  # the PROXY header's bytes so far, while awaited
        self._client: tuple[str, int] | None = None
        self._peer = ""

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._timer = self._loop.call_later(self._timeout, transport.abort)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""
        proxy = self._proxy
        if proxy is not None and proxy.balancer is not None and proxy.balancer(self._peer):
            self._header = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._header is not None:
            data = self._header + data
            try:
                header = parse_proxy_header(data)
            except ProxyHeaderError as exc:
                assert self._proxy is not None
                self._proxy.refused(self._peer, "proxy-header", {"why": str(exc)})
                self._header = None
                self._transport.abort()
                return
            if header is None:
                self._header = data
                return
            self._header = None
            self._client = header.source  # None (LOCAL): the balancer itself
            data = data[header.length:]
            if not data:
                return  # the first-byte deadline still runs
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if data[:1] != bytes([_TLS_RECORD]):
            transport.write(plain_http_answer(data[:8192]))
            transport.close()
            return
        from asyncio import sslproto

        waiter = self._loop.create_future()  # a failed handshake is asyncio's to log
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        options: dict[str, Any] = {"server_side": True, "ssl_handshake_timeout": self._timeout}
        app = self._factory()
        if self._client is not None:
            app.pv_client = self._client
        tls = sslproto.SSLProtocol(self._loop, app, self._tls, waiter, **options)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(data)
        while view:  # hand over the bytes already read
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]
