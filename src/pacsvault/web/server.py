"""Run the web application over HTTPS with the vault's hardened TLS context.

uvicorn serves the app from a socket we bind ourselves (port 0 works for tests) and with
our ``SSLContext`` (TLS 1.2/1.3, forward-secret AEAD suites only): never plain HTTP.
Connections go through ``web.limits`` (per-source and total caps, header and body
deadlines); the TLS handshake has the header deadline too. uvicorn's own log lines go to
the process's handler (one escaped line each, ``logsafe``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from pacsvault.audit.refusals import RefusalLog
from pacsvault.web.limits import WebLimits, guarded_protocol

STARTUP_TIMEOUT = 20.0


class WebService:
    def __init__(self, app: FastAPI, tls: ssl.SSLContext, limits: WebLimits | None = None,
                 refusals: RefusalLog | None = None) -> None:
        self._app = app
        self._tls = tls
        self._limits = limits or WebLimits()
        self._refusals = refusals
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, bind: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted sockets: small responses are not held ~40 ms by Nagle
        # (a viewer makes one request per frame).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((bind, port))
        sock.listen(128)
        bound = int(sock.getsockname()[1])
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
            target=lambda: _run(server, sock, limits.header_timeout), name="https",
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


def _run(server: uvicorn.Server, sock: socket.socket, handshake_timeout: float) -> None:
    """``asyncio.run(server.serve(...))`` with a TLS handshake deadline.

    uvicorn creates its server without ``ssl_handshake_timeout`` (asyncio's default is
    60 s): a client that never finishes its handshake would hold a connection that long,
    before our protocol (and its budget) even sees it.
    """

    def loop_factory() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        create_server = loop.create_server

        async def with_deadline(*args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", handshake_timeout)
            return await create_server(*args, **kwargs)

        loop.create_server = with_deadline  # type: ignore[method-assign]
        return loop

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve(sockets=[sock]))
