"""Sign-in: the password step, the second factor or its enrolment, sign-out.

Sign-in is the two steps of ``Accounts`` (see its docstring), each behind its own page, and
each moving the browser to a new session id (``sessions``):

``GET /login`` (anonymous session: a CSRF token for the form) → ``POST /login`` (password)
→ ``/login/enrol`` (first sign-in: an authenticator app's QR code, or a passkey; then the
recovery codes are shown once) or ``/login/second-factor`` (TOTP, passkey or recovery
code) → signed in, and back where the browser was going: a page that needs a session
sends a browser to ``/login?next=<path?query>``; ``next`` (a same-origin path only,
``kit.safe_next``) rides in the session through both steps. The default is ``/``, the study
list (the viewer, ``web/viewer.py``). The passkey steps are ``passkey_routes``; they share
``locked``, ``throttle_message``, ``signed_in_session`` and ``set_cookie`` with this module.

Every refusal is generic ("wrong user name, password or code"; "too many attempts, try
again in N seconds" with HTTP 429 and ``Retry-After``); the details go to the trail through
``Accounts``. These steps, the language switch and the static files are the only routes
without a role requirement, and the route inventory test lists them.

Every sentence shown is English in the code, marked for translation (``_``/``N_``, see
``i18n``) and translated for the request's language.

Routes are plain functions: FastAPI runs them in its thread pool, where the slow password
hash and the trail's fsync belong.
"""

from __future__ import annotations

import contextvars
import math
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from markupsafe import Markup
from starlette.responses import Response

from pacsvault.accounts.service import (
    AccountError,
    AuthOutcome,
    AuthResult,
    normalise_name,
)
from pacsvault.accounts.throttle import NEW_SOURCES, Verdict
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.web import i18n, pages
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_, Gettext
from pacsvault.web.kit import (
    HOME,
    LOGIN,
    FormName,
    FormSecret,
    FormShort,
    SignedIn,
    accounts_of,
    device_of,
    gettext,
    page,
    principal_of,
    redirect,
    safe_next,
    session_of,
    store_of,
    vault_of,
)
from pacsvault.web.principal import Principal
from pacsvault.web.sessions import (
    Stage,
    WebSession,
    account_state,
    clear_cookie_header,
    cookie_header,
    device_cookie_header,
)

router = APIRouter()

LOCKED_RETRY_AFTER = 3600  # an admin-only lock has no end; tell clients to come back later
LOGIN_FAILED = N_("Wrong user name, password or code.")
# After the password step passed, only the code can be wrong; a phone whose clock drifts
# makes every TOTP code wrong (issue 12, defect 8).
CODE_FAILED = N_("Wrong code. Type the code your authenticator app shows now (or a recovery "
                 "code). If it is refused again, check that the phone's date and time are "
                 "set automatically.")
# At enrolment there is no recovery code yet: only the new app's code.
ENROL_CODE_FAILED = N_("Wrong code. Type the code the authenticator app shows now for this "
                       "account. If it is refused again, check that the phone's date and "
                       "time are set automatically.")
SIGN_IN_EXPIRED = N_("The sign-in has expired: please start again.")
FORM_EXPIRED = N_("This form has expired: reload the page and try again.")
# The known-device cookie of a sign-in completing in this request (a route runs in its own
# copy of the context: set by ``signed_in_session``, sent by ``set_cookie``).
_NEW_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("pv_new_device", default="")


def set_cookie(response: Response, session_id: str) -> Response:
    """The new session's cookie on ``response``, and the known-device cookie of a sign-in
    completing in this request (``signed_in_session``)."""
    response.headers.append("set-cookie", cookie_header(session_id))
    device = _NEW_DEVICE.get()
    if device:
        _NEW_DEVICE.set("")
        response.headers.append("set-cookie", device_cookie_header(device))
    return response


def _emit(request: Request, action: str, user: str, detail: dict[str, str | int | bool],
          outcome: Outcome = Outcome.SUCCESS) -> None:
    vault_of(request).recorder.emit(AuditEvent(
        action=action, outcome=outcome, code=EventCode.USER_AUTHENTICATION, actor_user=user,
        actor_address=client_address(request), detail=detail,
    ))


def locked(result: AuthResult) -> bool:
    return result.outcome is AuthOutcome.LOCKED or (
        result.decision is not None and result.decision.verdict is Verdict.LOCKED)


def throttle_message(result: AuthResult, _: Gettext) -> tuple[str, int]:
    """(sentence, Retry-After seconds) for a refused or throttled attempt.

    It says what is blocked (this user name from this computer, this user name from new
    computers, or this computer for every name), for how long, and what works meanwhile.
    Naming the scope tells nothing about whether the name exists: unknown names go through
    the very same counters (``accounts.throttle``).
    """
    seconds = math.ceil(result.retry_after)
    if not (locked(result) or seconds <= 0):
        return _("Too many attempts. Wait {seconds} s before trying again.").format(
            seconds=seconds), seconds
    retry = seconds if seconds > 0 else LOCKED_RETRY_AFTER
    minutes = max(1, math.ceil(retry / 60))
    decision = result.decision
    scope = decision.scope if decision is not None else ""
    if scope == "address":
        address = decision.address if decision is not None else ""
        return _("Too many failed sign-ins from this computer ({address}), whatever the user "
                 "name: signing in from it is blocked for {minutes} min. An administrator "
                 "can lift the block now (Users page, or the command pacsvault user "
                 "unblock-address {address}).").format(address=address,
                                                       minutes=minutes), retry
    if scope == NEW_SOURCES:
        return _("Too many failed sign-ins with this user name from computers it was never "
                 "used on: signing in from a new computer is blocked for {minutes} min. "
                 "Computers and browsers you signed in with before still work. An "
                 "administrator can lift the block now (Users page, or the command pacsvault "
                 "user unlock followed by your user name).").format(minutes=minutes), retry
    return _("Too many failed sign-ins with this user name from this computer: signing in "
             "from here is blocked for {minutes} min. You can still sign in from a computer "
             "or browser you signed in with before. An administrator can lift the block now "
             "(Users page, or the command pacsvault user unlock followed by your user "
             "name).").format(minutes=minutes), retry


def _login_page(request: Request, status: int, message: str,
                headers: dict[str, str] | None = None, next_path: str = "") -> Response:
    """The sign-in form again, on a fresh anonymous session."""
    old = session_of(request)
    if old is not None and old.stage is Stage.PENDING:
        accounts_of(request).cancel(old.ticket)
    session_id, session = store_of(request).rotate(old, Stage.ANONYMOUS,
                                                   client_address(request))
    if next_path:
        session.next = next_path
        store_of(request).save(session)
    response = page(request, "login.html", status, session=session, headers=headers,
                    message=message, next=session.next)
    return set_cookie(response, session_id)


def _target(session: WebSession | None) -> str:
    return (session.next if session is not None else "") or HOME


# --- public: static files, language switch ---------------------------------------------


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    found = pages.static_file(name)
    if found is None:
        raise HTTPException(404, "not found")
    content, media_type = found
    return Response(content, media_type=media_type)


@router.post("/language")
def choose_language(request: Request, lang: Annotated[str, Form(max_length=8)] = "",
                    back: FormShort = "") -> Response:
    """The sign-in pages' language switch: a cookie (no account is known yet). Signed-in
    users choose on their account page, which wins over this cookie."""
    response = redirect(safe_next(back) or LOGIN)
    language = i18n.normalise(lang)
    if language:
        response.headers.append("set-cookie", i18n.cookie_header(language))
    return response


# --- sign-in ----------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "") -> Response:
    wanted = safe_next(next)
    if principal_of(request) is not None:
        return redirect(wanted or HOME)
    session = session_of(request)
    if session is not None and session.stage is Stage.ANONYMOUS:
        if wanted and wanted != session.next:
            session.next = wanted
            store_of(request).save(session)
        return page(request, "login.html", next=session.next)
    return _login_page(request, 200, "", next_path=wanted)


@router.post("/login")
def login(request: Request, name: FormName = "", password: FormSecret = "",
          next: FormShort = "") -> Response:
    _ = gettext(request)
    if principal_of(request) is not None:
        return redirect(safe_next(next) or HOME)
    session = session_of(request)
    if session is None:
        # No session, so no CSRF token to check this form against: refuse, offer a new one.
        return _login_page(request, 403, _(FORM_EXPIRED), next_path=safe_next(next))
    changed = False
    if not session.next and safe_next(next):
        session.next, changed = safe_next(next), True
    accounts = accounts_of(request)
    address = client_address(request)
    if session.stage is Stage.PENDING:  # signing in again from the start
        accounts.cancel(session.ticket)
        session.stage, session.ticket, session.user = Stage.ANONYMOUS, "", ""
        changed = True
    if changed:  # a refused attempt keeps this session: the next may reach another instance
        store_of(request).save(session)
    result = accounts.authenticate(name, password, address, device_of(request))
    if result.outcome is AuthOutcome.NEEDS_SECOND_FACTOR:
        enrolled = result.totp_enrolled or result.passkey_enrolled
        session_id, _pending_session = store_of(request).rotate(
            session, Stage.PENDING, address, user=normalise_name(name), ticket=result.ticket,
            enrolled=enrolled)
        target = "/login/second-factor" if enrolled else "/login/enrol"
        return set_cookie(redirect(target), session_id)
    return _refused(request, result, "login.html", next=session.next)


def refusal(result: AuthResult, _: Gettext, failed: str) -> tuple[int, str, dict[str, str]]:
    """(status, sentence, headers) for a failed, throttled or locked attempt, in generic
    wording: 429 with the throttle's sentence, or 401 with ``failed`` (a msgid), plus the
    wait when this failure started one. The pages (``_refused``) and the passkey script's
    JSON (``passkey_routes``) say the same thing."""
    if result.outcome in (AuthOutcome.DELAY, AuthOutcome.LOCKED) or locked(result):
        message, retry = throttle_message(result, _)
        return 429, message, {"Retry-After": str(retry)}
    headers: dict[str, str] = {}
    message = _(failed)
    if result.decision is not None and not result.decision.allowed:
        wait, retry = throttle_message(result, _)
        message = f"{message} {wait}"
        headers["Retry-After"] = str(retry)
    return 401, message, headers


def _refused(request: Request, result: AuthResult, template: str,
             **context: Any) -> Response:
    """The page for a failed, throttled or locked attempt (generic wording)."""
    failed = {"login.html": LOGIN_FAILED, "enrol.html": ENROL_CODE_FAILED}.get(template,
                                                                              CODE_FAILED)
    status, message, headers = refusal(result, gettext(request), failed)
    if status == 429 and template != "login.html" and locked(result):
        # The pending sign-in is over (Accounts cancelled its ticket): start again.
        return _login_page(request, 429, message, headers)
    return page(request, template, status, headers=headers, message=message, **context)


def _pending(request: Request) -> WebSession | None:
    session = session_of(request)
    if session is None or session.stage is not Stage.PENDING:
        return None
    return session


@router.get("/login/second-factor")
def second_factor_form(request: Request) -> Response:
    session = _pending(request)
    if session is None:
        return redirect(LOGIN)
    if not session.enrolled:
        return redirect("/login/enrol")
    return page(request, "second_factor.html")


@router.post("/login/second-factor")
def second_factor(request: Request, code: FormSecret = "") -> Response:
    session = _pending(request)
    if session is None or not session.enrolled:
        return redirect(LOGIN)
    result = accounts_of(request).verify_second_factor(session.ticket, code,
                                                       client_address(request))
    if result.outcome is AuthOutcome.SUCCESS:
        return _signed_in(request, session, result)
    return _refused(request, result, "second_factor.html")


def _enrol_context(request: Request, session: WebSession) -> dict[str, Any] | None:
    try:
        enrolment = accounts_of(request).enroll_totp(session.ticket, client_address(request))
    except AccountError:
        return None
    # segno's SVG, made from our own otpauth URI: no user input, safe to inline.
    return {"qr_svg": Markup(enrolment.qr_svg), "secret": enrolment.secret}  # noqa: S704


@router.get("/login/enrol")
def enrol_form(request: Request) -> Response:
    session = _pending(request)
    if session is None:
        return redirect(LOGIN)
    if session.enrolled:
        return redirect("/login/second-factor")
    context = _enrol_context(request, session)
    if context is None:
        return _login_page(request, 401, gettext(request)(SIGN_IN_EXPIRED))
    return page(request, "enrol.html", **context)


@router.post("/login/enrol")
def enrol(request: Request, code: FormSecret = "") -> Response:
    session = _pending(request)
    if session is None or session.enrolled:
        return redirect(LOGIN)
    result = accounts_of(request).verify_second_factor(session.ticket, code,
                                                       client_address(request))
    if result.outcome is AuthOutcome.SUCCESS:
        return _signed_in(request, session, result)
    if locked(result):
        return _refused(request, result, "enrol.html")  # back to the sign-in form
    context = _enrol_context(request, session)
    if context is None:
        return _login_page(request, 401, gettext(request)(SIGN_IN_EXPIRED))
    return _refused(request, result, "enrol.html", **context)


def signed_in_session(request: Request, pending: WebSession,
                      result: AuthResult) -> tuple[str, WebSession]:
    """Both factors right (``auth.login`` is recorded by Accounts): a new session id.

    Also remembers the known-device cookie to set: ``set_cookie`` adds it to the response
    (the passkey routes use both functions too).
    """
    if result.device_token:
        _NEW_DEVICE.set(result.device_token)
    state = account_state(vault_of(request), result.user)
    return store_of(request).rotate(
        pending, Stage.SIGNED_IN, client_address(request), user=result.user,
        password_changed=state.password_changed if state else None)


def _signed_in(request: Request, pending: WebSession, result: AuthResult) -> Response:
    session_id, session = signed_in_session(request, pending, result)
    principal = Principal(user=result.user, roles=result.roles, via_token=False,
                          address=client_address(request))
    target = _target(session)
    _ = gettext(request)
    response: Response
    if result.recovery_codes:
        response = page(request, "codes.html", session=session, principal=principal,
                        codes=result.recovery_codes, next=target)
    elif result.recovery_codes_left is not None:
        response = page(request, "notice.html", session=session, principal=principal,
                        heading=_("Sign in"), secret="", next=target,
                        lines=[_("You signed in with a recovery code; {left} left. Make new "
                                 "ones on your account page if you are running low.").format(
                                      left=result.recovery_codes_left)])
    else:
        response = redirect(target)
    return set_cookie(response, session_id)


@router.get("/login/recovery-codes")
def fresh_recovery_codes(request: Request, principal: SignedIn) -> Response:
    """The recovery codes of a passkey enrolment (made by a script's JSON call), shown
    once: the session forgets them as this page is rendered."""
    session = session_of(request)
    if session is None or not session.fresh_codes:
        return redirect(_target(session))
    codes, session.fresh_codes = session.fresh_codes, ()
    store_of(request).save(session)
    return page(request, "codes.html", codes=codes, next=_target(session))


@router.post("/logout")
def logout(request: Request) -> Response:
    session = session_of(request)
    if session is not None:
        store_of(request).drop(session)
        if session.stage is Stage.SIGNED_IN:
            _emit(request, "auth.logout", session.user, {"reason": "user"})
        elif session.stage is Stage.PENDING:
            accounts_of(request).cancel(session.ticket)
    response = redirect(LOGIN)
    response.headers.append("set-cookie", clear_cookie_header())
    return response

