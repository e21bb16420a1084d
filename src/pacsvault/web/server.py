"""Run the web application over HTTPS with the vault's hardened TLS context.

uvicorn serves the app from a socket we bind ourselves (port 0 works for tests) and with
our ``SSLContext`` (TLS 1.2/1.3, forward-secret AEAD suites only): never plain HTTP.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

STARTUP_TIMEOUT = 20.0


class WebService:
    def __init__(self, app: FastAPI, tls: ssl.SSLContext) -> None:
        self._app = app
        self._tls = tls
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
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, server_header=False,
            date_header=False, proxy_headers=False, lifespan="off",
        )
        config.load()
        config.ssl = self._tls  # our context, not uvicorn's defaults
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), name="https",
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
