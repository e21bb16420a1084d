"""A loopback webhook receiver: what the alert sink delivers, recorded for assertions."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from typing import Any


class Webhook:
    """Records each POSTed JSON body and its Authorization header; answers ``status``
    (a 302 points elsewhere, to show redirects are not followed). ``tls``: serve HTTPS."""

    def __init__(self, status: int = 200, tls: ssl.SSLContext | None = None,
                 path: str = "/hook") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                hook.auth.append(self.headers.get("Authorization", ""))
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
