"""Cross-cutting protections: trusted networks, security headers, sessions.

(The session and CSRF parts are being built; see the web-access issue notes.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.web.deps import client_address

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
        if not vault.settings.is_trusted(address):
            vault.recorder.emit(AuditEvent(
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
        return await call_next(request)
