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

import html
import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.web import i18n, pages, security

if TYPE_CHECKING:
    from pacsvault.sealed.runtime import SealedRuntime

CSRF_COOKIE = "__Host-pvunseal"
MAX_FAILURES = 5
WINDOW_SECONDS = 600.0
_MAX_PASSPHRASE = 1024

TEXT = {
    "en": {
        "sealed": "Archive sealed, an administrator must unlock it.",
        "title": "Unlock the archive",
        "intro": "The server started without its master key. It keeps receiving images "
                 "from the registered devices, but nothing can be read until an "
                 "administrator unlocks it.",
        "passphrase": "Passphrase of the master key",
        "unlock": "Unlock",
        "retry_intro": "If the key medium (USB key) was missing, put it back, then:",
        "retry": "Try again",
        "failed": "The archive could not be unlocked: check the passphrase or the key "
                  "medium.",
        "throttled": "Too many attempts from this address: wait a few minutes.",
        "forbidden": "Request refused (the form expired): reload the page.",
        "done": "The archive is unlocked.",
    },
    "fr": {
        "sealed": "Archive scellée, un administrateur doit la déverrouiller.",
        "title": "Déverrouiller l’archive",
        "intro": "Le serveur a démarré sans sa clé maîtresse. Il continue de recevoir les "
                 "images des appareils enregistrés, mais rien ne peut être lu tant qu’un "
                 "administrateur ne l’a pas déverrouillée.",
        "passphrase": "Phrase de passe de la clé maîtresse",
        "unlock": "Déverrouiller",
        "retry_intro": "Si le support de la clé (clé USB) était absent, remettez-le, puis :",
        "retry": "Réessayer",
        "failed": "L’archive n’a pas pu être déverrouillée : vérifiez la phrase de passe ou "
                  "le support de la clé.",
        "throttled": "Trop de tentatives depuis cette adresse : patientez quelques minutes.",
        "forbidden": "Requête refusée (le formulaire a expiré) : rechargez la page.",
        "done": "L’archive est déverrouillée.",
    },
}


def _text(request: Request) -> dict[str, str]:
    return TEXT.get(i18n.locale_for(request), TEXT["en"])


class SwitchApp:
    """The HTTPS listener's application: the sealed one, then (``app = ...``) the normal
    one, on the same listener and connections."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Throttle:
    """Failed unseal attempts per source address (in memory: a restart is an admin act)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, address: str) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = self._failures.get(address)
            while seen and now - seen[0] > WINDOW_SECONDS:
                seen.popleft()
            return bool(seen) and len(seen or ()) >= MAX_FAILURES

    def failed(self, address: str) -> None:
        with self._lock:
            self._failures.setdefault(address, deque()).append(time.monotonic())


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _page(request: Request, token: str, message: str = "", status: int = 503) -> Response:
    t = _text(request)
    lang = i18n.locale_for(request)
    note = f'<p class="message error" role="alert">{html.escape(message)}</p>' \
        if message else ""
    body = f"""<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{html.escape(t["title"])} · pacsvault</title>
<link rel="stylesheet" href="/static/style.css">
</head>
<body>
<header class="top"><span class="brand">pacsvault</span></header>
<main id="main">
<h1>{html.escape(t["title"])}</h1>
<p><strong>{html.escape(t["sealed"])}</strong></p>
<p>{html.escape(t["intro"])}</p>
{note}
<form method="post" action="/unseal">
<input type="hidden" name="csrf" value="{html.escape(token)}">
<label for="passphrase">{html.escape(t["passphrase"])}</label>
<input id="passphrase" name="passphrase" type="password" autocomplete="off"
 maxlength="{_MAX_PASSPHRASE}">
<button type="submit">{html.escape(t["unlock"])}</button>
</form>
<form method="post" action="/unseal">
<input type="hidden" name="csrf" value="{html.escape(token)}">
<p>{html.escape(t["retry_intro"])}</p>
<button type="submit" name="retry" value="1">{html.escape(t["retry"])}</button>
</form>
</main>
</body>
</html>
"""
    response = HTMLResponse(body, status_code=status, headers={"Retry-After": "60"})
    response.headers["Set-Cookie"] = (f"{CSRF_COOKIE}={token}; Path=/; Secure; HttpOnly; "
                                      "SameSite=Strict")
    return response


def sealed_response(request: Request) -> Response:
    """503 for every other request while sealed: a page for browsers, JSON for APIs."""
    t = _text(request)
    if pages.wants_html(request.scope):
        return HTMLResponse(
            f'<!doctype html><html lang="{i18n.locale_for(request)}"><head>'
            '<meta charset="utf-8"><title>pacsvault</title>'
            '<link rel="stylesheet" href="/static/style.css"></head><body><main id="main">'
            f'<h1>{html.escape(t["sealed"])}</h1><p><a href="/unseal">'
            f'{html.escape(t["title"])}</a></p></main></body></html>',
            status_code=503, headers={"Retry-After": "60"})
    return JSONResponse({"error": t["sealed"]}, status_code=503,
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
        t = _text(request)
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
            return _page(request, secrets.token_urlsafe(32), t["forbidden"], 403)
        if throttle.blocked(address):
            await run_in_threadpool(record, request, Outcome.MINOR_FAILURE,
                                    "unseal attempt throttled")
            return _page(request, secrets.token_urlsafe(32), t["throttled"], 429)
        passphrase = str(form.get("passphrase", ""))[:_MAX_PASSPHRASE] or None
        from pacsvault.sealed.runtime import UnsealError

        try:
            await run_in_threadpool(lambda: runtime.unseal(
                passphrase, actor_address=address, channel="web"))
        except UnsealError:
            throttle.failed(address)
            return _page(request, secrets.token_urlsafe(32), t["failed"], 400)
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
