"""HTTPS while sealed: one page, ``/unseal``; everything else answers 503.

There is no index, hence no accounts, while sealed: nobody can sign in, and the passphrase
(or, for a key medium put back, the "try again" button) is the only credential. So the
page is served only to the trusted networks (even with ``remote_access = "internet"``),
its form carries a CSRF token (double-submit: a ``__Host-`` cookie and a hidden field,
compared in constant time), attempts are throttled per source address, and every attempt
is an audit event (``sealed.unseal``, in the sealed journal until the merge). Once
unsealed, ``SwitchApp`` hands every request to the normal application; there ``/unseal``
only sends the browser to the sign-in page (``normal_router``).

The trusted-network gate (with its exposure event) and the security headers are the
normal application's own middlewares.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.web import i18n, pages, security

if TYPE_CHECKING:
    from pacsvault.sealed.runtime import SealedRuntime

CSRF_COOKIE = "__Host-pvunseal"
MAX_FAILURES = 5  # per source address and window
MAX_FAILURES_ALL = 20  # all sources together
_ALL = "*"  # the all-sources counter's key (never an address)
WINDOW_SECONDS = 600.0
MAX_PASSPHRASE = 1024  # as the template's maxlength

SEALED = "Archive sealed, an administrator must unlock it."  # msgid (sealed.html)


class SwitchApp:
    """The HTTPS listener's application: the sealed one, then (``app = ...``) the normal
    one, on the same listener and connections."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Throttle:
    """Failed unseal attempts per source address, and over all sources (guessing from many
    addresses of the practice network); in memory: a restart is an admin act. The CLI
    (``pacsvault unseal``, local and uid-checked) is never throttled."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _recent(seen: deque[float], now: float) -> int:
        while seen and now - seen[0] > WINDOW_SECONDS:
            seen.popleft()
        return len(seen)

    def blocked(self, address: str) -> bool:
        now = time.monotonic()
        with self._lock:
            mine = self._recent(self._failures.get(address, deque()), now)
            everyone = self._recent(self._failures.setdefault(_ALL, deque()), now)
            return mine >= MAX_FAILURES or everyone >= MAX_FAILURES_ALL

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures.setdefault(address, deque()).append(now)
            self._failures.setdefault(_ALL, deque()).append(now)


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _page(request: Request, token: str, problem: str = "", status: int = 503) -> Response:
    """The unseal page (``web/templates/sealed.html``, catalogs ``web/locale``), with a
    fresh CSRF token in its form and its cookie."""
    response = pages.render("sealed.html", {"form": True, "csrf": token, "problem": problem},
                            status, {"Retry-After": "60"}, i18n.locale_for(request))
    response.headers["Set-Cookie"] = (f"{CSRF_COOKIE}={token}; Path=/; Secure; HttpOnly; "
                                      "SameSite=Strict")
    return response


def sealed_response(request: Request) -> Response:
    """503 for every other request while sealed: a page for browsers, JSON for APIs."""
    language = i18n.locale_for(request)
    if pages.wants_html(request.scope):
        return pages.render("sealed.html", {"form": False, "problem": ""}, 503,
                            {"Retry-After": "60"}, language)
    return JSONResponse({"error": i18n.gettext_for(language)(SEALED)}, status_code=503,
                        headers={"Retry-After": "60"})


def create_sealed_app(runtime: SealedRuntime) -> FastAPI:
    app = FastAPI(title="pacsvault (sealed)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.vault = runtime.view  # the gate's settings and recorder
    throttle = Throttle()

    def trusted(request: Request) -> bool:
        return runtime.settings.is_trusted(_address(request))

    def record(request: Request, outcome: Outcome, message: str) -> None:
        runtime.recorder.emit(AuditEvent(
            action="sealed.unseal.page", outcome=outcome,
            code=EventCode.SECURITY_ALERT if outcome is not Outcome.SUCCESS
            else EventCode.APPLICATION_ACTIVITY,
            actor_address=_address(request), message=message, detail={"channel": "web"},
        ), required=False)

    @app.get("/unseal")
    async def unseal_form(request: Request) -> Response:
        if not trusted(request):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        return _page(request, secrets.token_urlsafe(32), status=200)

    @app.post("/unseal")
    async def unseal_submit(request: Request) -> Response:
        address = _address(request)
        if not trusted(request):
            await run_in_threadpool(record, request, Outcome.SERIOUS_FAILURE,
                                    "unseal attempt from outside the trusted networks")
            return JSONResponse({"error": "forbidden"}, status_code=403)
        form = await request.form()
        sent = str(form.get("csrf", ""))
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not sent or not cookie or not secrets.compare_digest(sent.encode(),
                                                                cookie.encode()):
            await run_in_threadpool(record, request, Outcome.MINOR_FAILURE,
                                    "unseal form refused: missing or wrong CSRF token")
            return _page(request, secrets.token_urlsafe(32), "expired", 403)
        if throttle.blocked(address):
            await run_in_threadpool(record, request, Outcome.MINOR_FAILURE,
                                    "unseal attempt throttled")
            return _page(request, secrets.token_urlsafe(32), "throttled", 429)
        passphrase = str(form.get("passphrase", ""))[:MAX_PASSPHRASE] or None
        from pacsvault.sealed.runtime import UnsealError

        try:
            await run_in_threadpool(lambda: runtime.unseal(
                passphrase, actor_address=address, channel="web"))
        except UnsealError:
            throttle.failed(address)
            return _page(request, secrets.token_urlsafe(32), "failed", 400)
        return RedirectResponse("/login", status_code=303)

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        found = pages.static_file(name)
        if found is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(found[0], media_type=found[1])

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                            "OPTIONS"])
    async def everything_else(request: Request, path: str) -> Response:
        return sealed_response(request)

    app.add_middleware(security.SecurityHeaders)
    app.add_middleware(security.TrustedNetworks)
    return app


# --- the normal application ----------------------------------------------------------------

normal_router = APIRouter()


@normal_router.get("/unseal", include_in_schema=False)
@normal_router.post("/unseal", include_in_schema=False)
async def not_sealed() -> Response:
    """Not sealed (any more): the unseal page's bookmark leads to the sign-in page."""
    return RedirectResponse("/login", status_code=303)
