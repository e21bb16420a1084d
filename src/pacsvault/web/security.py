"""Cross-cutting protections: trusted networks, security headers, sessions and CSRF.

Middleware order, outermost first: the trusted-network gate (an outsider gets nothing, not
even a login page, unless ``remote_access = "internet"``), the security headers (on every
response, errors included), then sessions with the CSRF rule (``sessions``).
"""

from __future__ import annotations

import datetime as dt

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.web.asgi import HttpMiddleware, peer_address
from pacsvault.web.sessions import SessionMiddleware, SessionStore

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_ENCODED = [(name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in HEADERS.items()]
_NAMES = frozenset(name for name, _ in _ENCODED)


def install(app: FastAPI) -> None:
    """Add the middlewares and the session store (``app.state.web_sessions``).

    Sessions use the accounts' clock, so tests move both with one fake clock.
    """
    web = app.state.vault.settings.web
    app.state.web_sessions = SessionStore(
        idle=dt.timedelta(minutes=web.session_idle_minutes),
        absolute=dt.timedelta(hours=web.session_absolute_hours),
        clock=app.state.accounts.throttle.now,
        sessions=app.state.vault.sessions,
    )
    # add_middleware wraps what is already there: the last added runs first.
    app.add_middleware(SessionMiddleware)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(TrustedNetworks)


class SecurityHeaders(HttpMiddleware):
    """Pure ASGI (not ``BaseHTTPMiddleware``, which re-streams every body through a queue
    and cost a third of a WADO-RS series transfer). A response may set its own value of a
    header (the viewer's CSP); the default fills in the rest."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The raw list, encoded once (``_ENCODED``), not ``MutableHeaders`` looking
                # each name up and setting it (issue 17: ~10 us of every response). A new
                # list, as ``MutableHeaders`` makes: the response's own stays as it was.
                raw = list(message.get("headers", ()))
                present = {name.lower() for name, _ in raw} & _NAMES
                raw += [h for h in _ENCODED if h[0] not in present] if present else _ENCODED
                message["headers"] = raw
            await send(message)

        await self.app(scope, receive, with_headers)


class TrustedNetworks(HttpMiddleware):
    """Outermost: a source outside the trusted networks gets a bare 403 and an exposure
    event, before sessions or routes see anything."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        vault = scope["app"].state.vault
        address = peer_address(scope)
        # "internet": deliberately exposed; sign-in and DICOMweb go on (with their own
        # checks) and administration refuses this source in deps.require_role.
        if vault.settings.is_trusted(address) or vault.settings.web.remote_access == "internet":
            await self.app(scope, receive, send)
            return
        await run_in_threadpool(vault.recorder.emit, AuditEvent(
            action="exposure", outcome=Outcome.MAJOR_FAILURE,
            code=EventCode.SECURITY_ALERT, actor_address=address,
            message=("EXPOSURE: this server is reachable from outside the practice "
                     f"network. An HTTPS request came from {address}, which is not in "
                     "the trusted networks. The request was refused."),
            detail={"port": "https"},
        ))
        response = JSONResponse({"error": "forbidden"}, status_code=403, headers=HEADERS)
        await response(scope, receive, send)
