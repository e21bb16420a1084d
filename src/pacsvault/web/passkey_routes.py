"""Passkey (WebAuthn) routes: JSON endpoints for ``static/passkey.js``, one form.

Sign-in (the pending session of ``signin``'s password step; like the other sign-in steps these
need no role, the ticket is the credential):

* ``POST /login/passkey/options``: request options for the ticket's user;
* ``POST /login/passkey/verify``: the assertion; success moves the browser to a new,
  signed-in session id exactly as a TOTP code does (``auth.login`` by ``Accounts``);
* ``POST /login/enrol/passkey/options`` and ``/verify``: at first sign-in, a passkey
  instead of the authenticator app (only for an account with no second factor yet); the
  recovery codes it earns are kept in the new session and shown once by
  ``GET /login/recovery-codes``, where ``verify`` sends the browser.

The signed-in user's own passkeys (``require_role(None)``): ``POST /account/passkeys/options``,
``POST /account/passkeys/verify`` (JSON), ``POST /account/passkeys/remove`` (a form).

All are POSTs: the CSRF middleware checks the ``X-CSRF-Token`` header the script sends
(or the form's field). Bodies are read here (at most ``MAX_BODY``), not by FastAPI, so a
request without a pending session gets a 401 rather than a validation error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from pacsvault.accounts.passkeys import (
    MAX_PASSKEYS,
    PasskeyError,
    Passkeys,
    RelyingParty,
    relying_party,
)
from pacsvault.accounts.service import AuthOutcome, AuthResult
from pacsvault.web import i18n
from pacsvault.web.account import account_page
from pacsvault.web.deps import client_address, require_role
from pacsvault.web.i18n import N_
from pacsvault.web.kit import ACCOUNT, HOME, LOGIN, PageRole, redirect, store_of
from pacsvault.web.principal import Principal
from pacsvault.web.sessions import Stage, WebSession
from pacsvault.web.signin import (
    LOGIN_FAILED,
    SIGN_IN_EXPIRED,
    locked,
    refusal,
    set_cookie,
    signed_in_session,
)

router = APIRouter()

MAX_BODY = 64 * 1024
SignedInApi = Annotated[Principal, Depends(require_role(None))]
SignedInPage = Annotated[Principal, Depends(PageRole(None))]


def _passkeys(request: Request) -> Passkeys:
    passkeys: Passkeys = request.app.state.passkeys
    return passkeys


def _rp(request: Request) -> RelyingParty:
    return relying_party(request.headers.get("host", ""), request.app.state.passkey_hosts)


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _options(text: str) -> Response:
    return Response(text, media_type="application/json")


async def _body(request: Request) -> dict[str, Any] | None:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            return None
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _credential(body: dict[str, Any] | None) -> str:
    value = body.get("credential") if body is not None else None
    return json.dumps(value) if isinstance(value, dict) else ""


def _pending(request: Request) -> WebSession | None:
    session: WebSession | None = getattr(request.state, "web_session", None)
    if session is None or session.stage is not Stage.PENDING or not session.ticket:
        return None
    return session


PASSKEY_REFUSED = N_("The passkey could not be used.")


def _expired(request: Request) -> JSONResponse:
    return _error(401, i18n.gettext(request)(SIGN_IN_EXPIRED), next=LOGIN)


def _refused_passkey(request: Request, exc: PasskeyError | None = None) -> JSONResponse:
    """400 with a translated sentence (``PasskeyError`` texts are English)."""
    _ = i18n.gettext(request)
    text = str(exc) if exc is not None else ""
    if "at most" in text:
        message = _("An account can have at most {count} passkeys.").format(
            count=MAX_PASSKEYS)
    elif "expired" in text:
        message = _("The passkey request has expired: try again.")
    elif "already registered" in text:
        message = _("This passkey is already registered.")
    else:
        message = _(PASSKEY_REFUSED)
    return _error(400, message)


# --- sign-in ----------------------------------------------------------------------------


def _ceremony_options(request: Request, session: WebSession | None,
                      begin: Callable[[str, str, RelyingParty], str]) -> Response:
    """The options of a ceremony for a pending sign-in, ``begin(ticket, address, rp)``: no
    such sign-in is a 401 with the way back, a refusal (an unknown host) a translated 400."""
    if session is None:
        return _expired(request)
    try:
        rp = _rp(request)
        return _options(begin(session.ticket, client_address(request), rp))
    except PasskeyError:
        return _refused_passkey(request)


@router.post("/login/passkey/options")
def login_options(request: Request) -> Response:
    return _ceremony_options(request, _pending(request),
                             _passkeys(request).authentication_options)


@router.post("/login/passkey/verify")
async def login_verify(request: Request) -> Response:
    session = _pending(request)
    if session is None:
        return _expired(request)
    credential = _credential(await _body(request))
    return await run_in_threadpool(_login_verify, request, session, credential)


def _login_verify(request: Request, session: WebSession, credential: str) -> Response:
    address = client_address(request)
    try:
        rp = _rp(request)
    except PasskeyError:
        return _refused_passkey(request)
    result = _passkeys(request).verify_authentication(session.ticket, address, rp, credential)
    if result.outcome is AuthOutcome.SUCCESS:
        return _signed_in(request, session, result)
    return _refused(request, result)


def _refused(request: Request, result: AuthResult) -> JSONResponse:
    status, message, headers = refusal(result, i18n.gettext(request), LOGIN_FAILED)
    extra = {"next": LOGIN} if status == 429 and locked(result) else {}
    return _error(status, message, headers, **extra)


def _signed_in(request: Request, pending: WebSession, result: AuthResult) -> Response:
    """As ``signin._signed_in``: a new session id for the signed-in session; the script goes
    where the browser was going (or to the recovery codes of a passkey enrolment)."""
    session_id, session = signed_in_session(request, pending, result)
    target = session.next or HOME
    if result.recovery_codes:
        session.fresh_codes = result.recovery_codes
        store_of(request).save(session)  # the next request may reach another instance
        target = "/login/recovery-codes"
    response = JSONResponse({"ok": True, "next": target})
    return set_cookie(response, session_id)


# --- first sign-in: a passkey as the second factor -----------------------------------------


@router.post("/login/enrol/passkey/options")
def enrol_options(request: Request) -> Response:
    session = _pending(request)
    return _ceremony_options(request, None if session is None or session.enrolled else session,
                             _passkeys(request).enrolment_options)


@router.post("/login/enrol/passkey/verify")
async def enrol_verify(request: Request) -> Response:
    session = _pending(request)
    if session is None or session.enrolled:
        return _expired(request)
    body = await _body(request)
    label = body.get("label", "") if body is not None else ""
    return await run_in_threadpool(_enrol_verify, request, session, _credential(body),
                                   label if isinstance(label, str) else "")


def _enrol_verify(request: Request, session: WebSession, credential: str,
                  label: str) -> Response:
    try:
        rp = _rp(request)
    except PasskeyError:
        return _refused_passkey(request)
    result = _passkeys(request).verify_enrolment(session.ticket, client_address(request), rp,
                                                 credential, label)
    if result.outcome is AuthOutcome.SUCCESS:
        return _signed_in(request, session, result)
    return _refused(request, result)


# --- the signed-in user's passkeys ------------------------------------------------------


@router.post("/account/passkeys/options")
def account_options(request: Request, principal: SignedInApi) -> Response:
    try:
        return _options(_passkeys(request).registration_options(principal.user, _rp(request)))
    except PasskeyError as exc:
        return _refused_passkey(request, exc)


@router.post("/account/passkeys/verify")
async def account_verify(request: Request, principal: SignedInApi) -> Response:
    body = await _body(request)
    label = body.get("label", "") if body is not None else ""
    credential = _credential(body)
    return await run_in_threadpool(_account_verify, request, principal, credential,
                                   label if isinstance(label, str) else "")


def _account_verify(request: Request, principal: Principal, credential: str,
                    label: str) -> Response:
    try:
        info = _passkeys(request).verify_registration(
            principal.user, _rp(request), credential, label,
            address=client_address(request))
    except PasskeyError as exc:
        return _refused_passkey(request, exc)
    return JSONResponse({"ok": True, "passkey": info.key_id, "next": ACCOUNT})


@router.post("/account/passkeys/remove")
def account_remove(request: Request, principal: SignedInPage,
                   key: Annotated[str, Form(max_length=64)] = "") -> Response:
    if not _passkeys(request).remove(principal.user, key, address=client_address(request)):
        return account_page(request, principal, 404,
                            i18n.gettext(request)(PASSKEY_REFUSED))
    return redirect(f"{ACCOUNT}?notice=passkey")
