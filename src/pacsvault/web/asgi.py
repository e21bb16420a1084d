"""What the web app's pure-ASGI middlewares share (``security.SecurityHeaders``,
``security.TrustedNetworks``, ``sessions.SessionMiddleware``).

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which re-streams every body through
a queue (a third of a WADO-RS series transfer) and cannot hand a read form body on.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HttpMiddleware:
    """Lifespan and other non-HTTP scopes pass straight through; each HTTP request goes to
    ``handle``, which calls ``self.app`` (or answers itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


def peer_address(scope: Scope) -> str:
    """The peer's address of the connection ("" when the server gives none)."""
    client = scope.get("client")
    return str(client[0]) if client else ""
