"""Cross-cutting protections: trusted networks, security headers, sessions and CSRF.

Middleware order, outermost first: the trusted-network gate (an outsider gets nothing, not
even a login page, unless ``remote_access = "internet"``), the security headers (on every
response, errors included), then sessions with the CSRF rule (``sessions``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.web.deps import client_address
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

Handler = Callable[[Request], Awaitable[Response]]


def install(app: FastAPI) -> None:
    """Add the middlewares and the session store (``app.state.web_sessions``).

    Sessions use the accounts' clock, so tests move both with one fake clock.
    """
    web = app.state.vault.settings.web
    app.state.web_sessions = SessionStore(
        idle=dt.timedelta(minutes=web.session_idle_minutes),
        absolute=dt.timedelta(hours=web.session_absolute_hours),
        clock=app.state.accounts.throttle.now,
    )
    app.add_middleware(SessionMiddleware)

    @app.middleware("http")
    async def headers(request: Request, call_next: Handler) -> Response:
        response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.middleware("http")
    async def trusted_networks(request: Request, call_next: Handler) -> Response:
        vault = request.app.state.vault
        address = client_address(request)
        if vault.settings.is_trusted(address):
            return await call_next(request)
        if vault.settings.web.remote_access == "internet":
            # Deliberately exposed: sign-in and DICOMweb go on (with their own checks);
            # administration refuses this source in deps.require_role.
            return await call_next(request)
        await run_in_threadpool(vault.recorder.emit, AuditEvent(
            action="exposure", outcome=Outcome.MAJOR_FAILURE,
            code=EventCode.SECURITY_ALERT, actor_address=address,
            message=("EXPOSURE: this server is reachable from outside the practice "
                     f"network. An HTTPS request came from {address}, which is not in "
                     "the trusted networks. The request was refused."),
            detail={"port": "https"},
        ))
        response: Response = JSONResponse({"error": "forbidden"}, status_code=403)
        for name, value in HEADERS.items():
            response.headers[name] = value
        return response
