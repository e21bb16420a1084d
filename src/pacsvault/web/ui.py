"""Sign-in, second factor, sessions and account pages; user administration; OpenAPI.

Sign-in is the two steps of ``Accounts`` (see its docstring), each behind its own page, and
each moving the browser to a new session id (``sessions``):

``GET /login`` (anonymous session: a CSRF token for the form) → ``POST /login`` (password)
→ ``/login/enrol`` (first sign-in: an authenticator app's QR code, or a passkey; then the
recovery codes are shown once) or ``/login/second-factor`` (TOTP, passkey or recovery
code) → signed in, and back where the browser was going: a page that needs a session
sends a browser to ``/login?next=<path?query>``; ``next`` (a same-origin path only,
``safe_next``) rides in the session through both steps. The default is ``/``, the study
list (the viewer, ``web/viewer.py``).

Every refusal is generic ("wrong user name, password or code"; "too many attempts, try
again in N seconds" with HTTP 429 and ``Retry-After``); the details go to the trail through
``Accounts``. Every page and form route declares who may use it (``PageRole``, a
``deps.RoleRequirement``); the only routes without one are the sign-in steps themselves,
the language switch and the static files, and the route inventory test lists them.

Every sentence shown is English in the code, marked for translation (``_``/``N_``, see
``i18n``) and translated for the request's language.

Routes are plain functions: FastAPI runs them in its thread pool, where the slow password
hash and the trail's fsync belong.
"""

from __future__ import annotations

import contextvars
import copy
import json
import math
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse
from markupsafe import Markup
from starlette.responses import Response

from pacsvault import __version__
from pacsvault.accounts import preferences
from pacsvault.accounts.models import ROLES
from pacsvault.accounts.passwords import generate_password
from pacsvault.accounts.service import (
    AccountError,
    Accounts,
    AuthOutcome,
    AuthResult,
    PasswordRejected,
    check_name,
    normalise_name,
)
from pacsvault.accounts.throttle import NEW_SOURCES, Verdict
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.vault import Vault
from pacsvault.web import i18n, pages
from pacsvault.web.deps import RoleRequirement, client_address, require_role
from pacsvault.web.i18n import N_, Gettext
from pacsvault.web.principal import Principal
from pacsvault.web.sessions import (
    DEVICE_COOKIE,
    SessionStore,
    Stage,
    WebSession,
    account_state,
    clear_cookie_header,
    cookie_header,
    device_cookie_header,
)

router = APIRouter()

LOGIN = "/login"
HOME = "/"  # the study list
ACCOUNT = "/account"
# A password or code longer than this is not one (and must not cost a slow hash).
MAX_SECRET = 1024
MAX_NAME = 256
MAX_NEXT = 2048
LOCKED_RETRY_AFTER = 3600  # an admin-only lock has no end; tell clients to come back later
SIGN_IN_LABELS = {"auth.login": N_("signed in"), "auth.login.failed": N_("failed"),
                  "auth.account.locked": N_("account locked"),
                  "auth.logout": N_("signed out")}
NOTICES = {"password": N_("Your password was changed. Your other sessions were signed out."),
           "token": N_("The token was revoked."),
           "passkey": N_("The passkey was removed."),
           "language": N_("Your language was saved.")}
ROLE_NAMES = {"physician": N_("physician"), "admin": N_("administrator"),
              "auditor": N_("auditor")}
TRAIL_WINDOW = 512 * 1024
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
# copy of the context: set by ``signed_in_session``, sent by ``_set_cookie``).
_NEW_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("pv_new_device", default="")


def safe_next(value: str | None) -> str:
    """``value`` if it is a path of this site (``/...``, no scheme, no host, no
    backslash, no control character, not a sign-in step), else ""."""
    if not value or len(value) > MAX_NEXT or not value.startswith("/"):
        return ""
    if value.startswith("//") or "\\" in value or any(ord(c) < 0x20 or c == "\x7f"
                                                      for c in value):
        return ""
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return ""
    if parts.path == LOGIN or parts.path.startswith(LOGIN + "/") or parts.path == "/logout":
        return ""
    return value


def login_url(next_path: str = "") -> str:
    target = safe_next(next_path)
    if not target or target == HOME:
        return LOGIN
    return f"{LOGIN}?next={quote(target, safe='/')}"


class PageRole(RoleRequirement):
    """``RoleRequirement`` for pages: a browser without a session is sent to the sign-in
    form (303, with ``next`` = where it was going, for GETs) instead of getting a bare 401;
    API clients (an Authorization header) still get 401."""

    async def __call__(self, request: Request) -> Principal:
        try:
            return await super().__call__(request)
        except HTTPException as exc:
            if exc.status_code == 401 and "authorization" not in request.headers:
                target = ""
                if request.method == "GET":
                    target = request.url.path + (f"?{request.url.query}"
                                                 if request.url.query else "")
                raise HTTPException(303, "sign in",
                                    headers={"Location": login_url(target)}) from None
            raise


SignedIn = Annotated[Principal, Depends(PageRole(None))]
AdminPage = Annotated[Principal, Depends(PageRole("admin"))]
AdminApi = Annotated[Principal, Depends(require_role("admin"))]
FormName = Annotated[str, Form(max_length=MAX_NAME)]
FormSecret = Annotated[str, Form(max_length=MAX_SECRET)]
FormShort = Annotated[str, Form(max_length=MAX_NEXT)]


# --- helpers ---------------------------------------------------------------------------


def _vault(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _store(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.web_sessions
    return store


def _session(request: Request) -> WebSession | None:
    session: WebSession | None = getattr(request.state, "web_session", None)
    return session


def _principal(request: Request) -> Principal | None:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal


def gettext(request: Request) -> Gettext:
    return i18n.gettext(request)


def _page(request: Request, template: str, status: int = 200, *,
          session: WebSession | None = None, headers: dict[str, str] | None = None,
          **context: Any) -> Response:
    current = session or _session(request)
    values: dict[str, Any] = {"csrf": current.csrf if current else "",
                              "principal": _principal(request),
                              "here": request.url.path, "role_names": ROLE_NAMES}
    values.update(context)
    return pages.render(template, values, status, headers, i18n.locale_for(request))


def _redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303)


def _set_cookie(response: Response, session_id: str) -> Response:
    response.headers.append("set-cookie", cookie_header(session_id))
    device = _NEW_DEVICE.get()
    if device:
        _NEW_DEVICE.set("")
        response.headers.append("set-cookie", device_cookie_header(device))
    return response


def _device(request: Request) -> str:
    """The browser's known-device cookie (``accounts.devices``), or ""."""
    return request.cookies.get(DEVICE_COOKIE, "")[:64]


def _emit(request: Request, action: str, user: str, detail: dict[str, str | int | bool],
          outcome: Outcome = Outcome.SUCCESS) -> None:
    _vault(request).recorder.emit(AuditEvent(
        action=action, outcome=outcome, code=EventCode.USER_AUTHENTICATION, actor_user=user,
        actor_address=client_address(request), detail=detail,
    ))


def _locked(result: AuthResult) -> bool:
    return result.outcome is AuthOutcome.LOCKED or (
        result.decision is not None and result.decision.verdict is Verdict.LOCKED)


def _throttle_message(result: AuthResult, _: Gettext) -> tuple[str, int]:
    """(sentence, Retry-After seconds) for a refused or throttled attempt.

    It says what is blocked (this user name from this computer, this user name from new
    computers, or this computer for every name), for how long, and what works meanwhile.
    Naming the scope tells nothing about whether the name exists: unknown names go through
    the very same counters (``accounts.throttle``).
    """
    seconds = math.ceil(result.retry_after)
    if not (_locked(result) or seconds <= 0):
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
    old = _session(request)
    if old is not None and old.stage is Stage.PENDING:
        _accounts(request).cancel(old.ticket)
    session_id, session = _store(request).rotate(old, Stage.ANONYMOUS,
                                                 client_address(request))
    if next_path:
        session.next = next_path
    response = _page(request, "login.html", status, session=session, headers=headers,
                     message=message, next=session.next)
    return _set_cookie(response, session_id)


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
    response = _redirect(safe_next(back) or LOGIN)
    language = i18n.normalise(lang)
    if language:
        response.headers.append("set-cookie", i18n.cookie_header(language))
    return response


# --- sign-in ----------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "") -> Response:
    wanted = safe_next(next)
    if _principal(request) is not None:
        return _redirect(wanted or HOME)
    session = _session(request)
    if session is not None and session.stage is Stage.ANONYMOUS:
        if wanted:
            session.next = wanted
        return _page(request, "login.html", next=session.next)
    return _login_page(request, 200, "", next_path=wanted)


@router.post("/login")
def login(request: Request, name: FormName = "", password: FormSecret = "",
          next: FormShort = "") -> Response:
    _ = gettext(request)
    if _principal(request) is not None:
        return _redirect(safe_next(next) or HOME)
    session = _session(request)
    if session is None:
        # No session, so no CSRF token to check this form against: refuse, offer a new one.
        return _login_page(request, 403, _(FORM_EXPIRED), next_path=safe_next(next))
    if not session.next:
        session.next = safe_next(next)
    accounts = _accounts(request)
    address = client_address(request)
    if session.stage is Stage.PENDING:  # signing in again from the start
        accounts.cancel(session.ticket)
        session.stage, session.ticket, session.user = Stage.ANONYMOUS, "", ""
    result = accounts.authenticate(name, password, address, _device(request))
    if result.outcome is AuthOutcome.NEEDS_SECOND_FACTOR:
        enrolled = result.totp_enrolled or result.passkey_enrolled
        session_id, _pending_session = _store(request).rotate(
            session, Stage.PENDING, address, user=normalise_name(name), ticket=result.ticket,
            enrolled=enrolled)
        target = "/login/second-factor" if enrolled else "/login/enrol"
        return _set_cookie(_redirect(target), session_id)
    return _refused(request, result, "login.html", next=session.next)


def _refused(request: Request, result: AuthResult, template: str,
             **context: Any) -> Response:
    """The page for a failed, throttled or locked attempt (generic wording)."""
    _ = gettext(request)
    if result.outcome in (AuthOutcome.DELAY, AuthOutcome.LOCKED) or _locked(result):
        message, retry = _throttle_message(result, _)
        headers = {"Retry-After": str(retry)}
        if template != "login.html" and _locked(result):
            # The pending sign-in is over (Accounts cancelled its ticket): start again.
            return _login_page(request, 429, message, headers)
        return _page(request, template, 429, headers=headers, message=message, **context)
    headers = {}
    failed = {"login.html": LOGIN_FAILED, "enrol.html": ENROL_CODE_FAILED}.get(template,
                                                                              CODE_FAILED)
    message = _(failed)
    if result.decision is not None and not result.decision.allowed:
        wait, retry = _throttle_message(result, _)
        message = f"{message} {wait}"
        headers["Retry-After"] = str(retry)
    return _page(request, template, 401, headers=headers, message=message, **context)


def _pending(request: Request) -> WebSession | None:
    session = _session(request)
    if session is None or session.stage is not Stage.PENDING:
        return None
    return session


@router.get("/login/second-factor")
def second_factor_form(request: Request) -> Response:
    session = _pending(request)
    if session is None:
        return _redirect(LOGIN)
    if not session.enrolled:
        return _redirect("/login/enrol")
    return _page(request, "second_factor.html")


@router.post("/login/second-factor")
def second_factor(request: Request, code: FormSecret = "") -> Response:
    session = _pending(request)
    if session is None or not session.enrolled:
        return _redirect(LOGIN)
    result = _accounts(request).verify_second_factor(session.ticket, code,
                                                     client_address(request))
    if result.outcome is AuthOutcome.SUCCESS:
        return _signed_in(request, session, result)
    return _refused(request, result, "second_factor.html")


def _enrol_context(request: Request, session: WebSession) -> dict[str, Any] | None:
    try:
        enrolment = _accounts(request).enroll_totp(session.ticket, client_address(request))
    except AccountError:
        return None
    # segno's SVG, made from our own otpauth URI: no user input, safe to inline.
    return {"qr_svg": Markup(enrolment.qr_svg), "secret": enrolment.secret}  # noqa: S704


@router.get("/login/enrol")
def enrol_form(request: Request) -> Response:
    session = _pending(request)
    if session is None:
        return _redirect(LOGIN)
    if session.enrolled:
        return _redirect("/login/second-factor")
    context = _enrol_context(request, session)
    if context is None:
        return _login_page(request, 401, gettext(request)(SIGN_IN_EXPIRED))
    return _page(request, "enrol.html", **context)


@router.post("/login/enrol")
def enrol(request: Request, code: FormSecret = "") -> Response:
    session = _pending(request)
    if session is None or session.enrolled:
        return _redirect(LOGIN)
    result = _accounts(request).verify_second_factor(session.ticket, code,
                                                     client_address(request))
    if result.outcome is AuthOutcome.SUCCESS:
        return _signed_in(request, session, result)
    if _locked(result):
        return _refused(request, result, "enrol.html")  # back to the sign-in form
    context = _enrol_context(request, session)
    if context is None:
        return _login_page(request, 401, gettext(request)(SIGN_IN_EXPIRED))
    return _refused(request, result, "enrol.html", **context)


def signed_in_session(request: Request, pending: WebSession,
                      result: AuthResult) -> tuple[str, WebSession]:
    """Both factors right (``auth.login`` is recorded by Accounts): a new session id.

    Also remembers the known-device cookie to set: ``_set_cookie`` adds it to the response
    (the passkey routes use both functions too).
    """
    if result.device_token:
        _NEW_DEVICE.set(result.device_token)
    state = account_state(_vault(request), result.user)
    return _store(request).rotate(
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
        response = _page(request, "codes.html", session=session, principal=principal,
                         codes=result.recovery_codes, next=target)
    elif result.recovery_codes_left is not None:
        response = _page(request, "notice.html", session=session, principal=principal,
                         heading=_("Sign in"), secret="", next=target,
                         lines=[_("You signed in with a recovery code; {left} left. Make new "
                                  "ones on your account page if you are running low.").format(
                                      left=result.recovery_codes_left)])
    else:
        response = _redirect(target)
    return _set_cookie(response, session_id)


@router.get("/login/recovery-codes")
def fresh_recovery_codes(request: Request, principal: SignedIn) -> Response:
    """The recovery codes of a passkey enrolment (made by a script's JSON call), shown
    once: the session forgets them as this page is rendered."""
    session = _session(request)
    if session is None or not session.fresh_codes:
        return _redirect(_target(session))
    codes, session.fresh_codes = session.fresh_codes, ()
    return _page(request, "codes.html", codes=codes, next=_target(session))


@router.post("/logout")
def logout(request: Request) -> Response:
    session = _session(request)
    if session is not None:
        _store(request).drop(session)
        if session.stage is Stage.SIGNED_IN:
            _emit(request, "auth.logout", session.user, {"reason": "user"})
        elif session.stage is Stage.PENDING:
            _accounts(request).cancel(session.ticket)
    response = _redirect(LOGIN)
    response.headers.append("set-cookie", clear_cookie_header())
    return response


# --- the user's own account -------------------------------------------------------------


def recent_sign_ins(trail: Path, user: str, limit: int = 10,
                    window: int = TRAIL_WINDOW) -> list[dict[str, str]]:
    """The user's latest sign-in events, newest first, from the end of the trail.

    Only the last ``window`` bytes are read (a page view must not scan a year of trail);
    these lines are shown, not trusted: ``audit verify`` is what checks the trail.
    ``outcome`` is an English msgid (translated by the page).
    """
    found: list[dict[str, str]] = []
    for body in tail_records(trail, window):
        if body.get("user") != user:
            continue
        label = SIGN_IN_LABELS.get(str(body.get("action", "")))
        if label is None:
            continue
        when = str(body.get("time", ""))[:19].replace("T", " ")
        found.append({"time": f"{when} UTC", "address": str(body.get("address", "")),
                      "outcome": label})
        if len(found) >= limit:
            break
    return found


def tail_records(trail: Path, window: int = TRAIL_WINDOW) -> list[dict[str, Any]]:
    """The trail's last records (parsed JSON, not verified), newest first."""
    try:
        with open(trail, "rb") as fh:
            size = fh.seek(0, 2)
            start = max(0, size - window)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first one is cut
    found: list[dict[str, Any]] = []
    for line in reversed(lines):
        try:
            body = json.loads(line)
        except ValueError:
            continue
        if isinstance(body, dict):
            found.append(body)
    return found


def _account_page(request: Request, principal: Principal, status: int = 200,
                  message: str = "", message_kind: str = "error",
                  field_errors: dict[str, str] | None = None) -> Response:
    accounts = _accounts(request)
    info = accounts.get_user(principal.user)
    tokens = accounts.list_tokens(principal.user)
    now = accounts.throttle.now()
    token_status = {
        t.token_id: "revoked" if t.revoked else "expired" if t.expires <= now else "active"
        for t in tokens
    }
    sign_ins = recent_sign_ins(_vault(request).audit.path, principal.user)
    passkeys = request.app.state.passkeys.list_passkeys(principal.user)
    preference = i18n.normalise(getattr(request.state, "language", ""))
    return _page(request, "account.html", status, user=info, tokens=tokens,
                 tok_status=token_status, sign_ins=sign_ins, message=message,
                 message_kind=message_kind, passkeys=passkeys, preference=preference,
                 field_errors=field_errors or {}, nav="account")


@router.get("/account")
def account(request: Request, principal: SignedIn, notice: str = "") -> Response:
    text = gettext(request)(NOTICES[notice]) if notice in NOTICES else ""
    return _account_page(request, principal, message=text, message_kind="ok")


def password_problems(codes: tuple[str, ...], bits: float, required: float,
                      _: Gettext) -> list[str]:
    """The password policy's verdict (``PasswordCheck.codes``), in the page's language."""
    texts = {
        "too-long": _("The password is too long."),
        "control": _("The password contains control characters."),
        "weak": _("The password is too weak ({bits} bits, {required} needed): make it "
                  "longer; a phrase of several words is easiest to remember.").format(
                      bits=f"{bits:.0f}", required=f"{required:.0f}"),
        "common": _("The password is one of the most common passwords (or a variant)."),
        "walk": _("The password is a keyboard or alphabet sequence."),
        "user-name": _("The password contains the user name."),
    }
    return [texts.get(code, _("The password is not accepted.")) for code in codes]


@router.post("/account/password")
def change_password(request: Request, principal: SignedIn, current: FormSecret = "",
                    new: FormSecret = "", repeat: FormSecret = "") -> Response:
    _ = gettext(request)
    accounts = _accounts(request)
    address = client_address(request)
    if new != repeat:
        text = _("The two new passwords differ.")
        return _account_page(request, principal, 400, text, field_errors={"repeat": text})
    # The current password goes through sign-in's first step: throttled and recorded like
    # any guess, so a borrowed session cannot be used to try passwords.
    check = accounts.authenticate(principal.user, current, address, _device(request))
    if check.outcome in (AuthOutcome.DELAY, AuthOutcome.LOCKED):
        message, retry = _throttle_message(check, _)
        response = _account_page(request, principal, 429, message)
        response.headers["Retry-After"] = str(retry)
        return response
    if check.outcome is not AuthOutcome.NEEDS_SECOND_FACTOR:
        text = _("The current password is wrong.")
        return _account_page(request, principal, 400, text, field_errors={"current": text})
    accounts.cancel(check.ticket)
    verdict = accounts.check_password(new, principal.user)
    if not verdict.ok:
        text = " ".join(password_problems(verdict.codes, verdict.bits, verdict.required_bits,
                                          _))
        return _account_page(request, principal, 400, text, field_errors={"new": text})
    try:
        accounts.reset(principal.user, new, by=principal.user, address=address)
    except PasswordRejected:
        text = _("The password is not accepted.")
        return _account_page(request, principal, 400, text, field_errors={"new": text})
    session = _session(request)
    state = account_state(_vault(request), principal.user)
    if session is not None and state is not None:
        session.password_changed = state.password_changed
    _store(request).drop_user(principal.user, keep=session)
    return _redirect(f"{ACCOUNT}?notice=password")


@router.post("/account/language")
def change_language(request: Request, principal: SignedIn,
                    lang: Annotated[str, Form(max_length=8)] = "") -> Response:
    """The user's language ("" = as the browser asks), kept with the account."""
    language = i18n.normalise(lang)
    preferences.set_language(_vault(request).sessions, principal.user, language)
    response = _redirect(f"{ACCOUNT}?notice=language")
    if language:  # the sign-in page, after signing out, speaks it too
        response.headers.append("set-cookie", i18n.cookie_header(language))
    return response


@router.post("/account/recovery-codes")
def new_recovery_codes(request: Request, principal: SignedIn) -> Response:
    _ = gettext(request)
    try:
        codes = _accounts(request).new_recovery_codes(principal.user, by=principal.user,
                                                      address=client_address(request))
    except AccountError:
        return _account_page(request, principal, 400, _("Set up a second factor first."))
    return _page(request, "codes.html", codes=codes, next=ACCOUNT)


@router.post("/account/tokens/{token_id}/revoke")
def revoke_own_token(request: Request, principal: SignedIn, token_id: str) -> Response:
    accounts = _accounts(request)
    if token_id not in {t.token_id for t in accounts.list_tokens(principal.user)}:
        raise HTTPException(404, "not found")
    accounts.revoke_token(token_id, by=principal.user, address=client_address(request))
    return _redirect(f"{ACCOUNT}?notice=token")


# --- administration: users ----------------------------------------------------------------


def _users_page(request: Request, status: int = 200, message: str = "",
                field_errors: dict[str, str] | None = None,
                values: dict[str, Any] | None = None) -> Response:
    accounts = _accounts(request)
    return _page(request, "admin_users.html", status, users=accounts.list_users(),
                 blocks=accounts.blocks(), roles=ROLES, message=message,
                 field_errors=field_errors or {},
                 values=values or {"name": "", "roles": []}, nav="admin", admin_nav="users")


def _user_error(request: Request, exc: AccountError, name: str) -> tuple[str, str]:
    """(field, translated sentence) for a refused user creation."""
    _ = gettext(request)
    if isinstance(exc, PasswordRejected):  # a generated password: cannot happen
        return "name", _("The password is not accepted.")
    try:
        norm = check_name(name)
    except AccountError:
        return "name", _("A user name is 1 to 64 characters among a-z, 0-9, '.', '_', '-', "
                         "'@', starting with a letter or a digit.")
    if "already exists" in str(exc):
        return "name", _("A user named {name} already exists.").format(name=norm)
    return "roles", _("Choose at least one role.")


@router.get("/admin/users")
def admin_users(request: Request, principal: AdminPage) -> Response:
    return _users_page(request)


@router.post("/admin/users")
def admin_add_user(request: Request, principal: AdminPage, name: FormName = "",
                   roles: Annotated[list[str] | None, Form()] = None) -> Response:
    _ = gettext(request)
    password = generate_password()
    chosen = [r for r in (roles or []) if r in ROLES]
    try:
        info = _accounts(request).add_user(name, chosen, password, by=principal.user,
                                           address=client_address(request))
    except AccountError as exc:
        field, text = _user_error(request, exc, name)
        return _users_page(request, 400, text, {field: text},
                           {"name": name, "roles": chosen})
    return _page(request, "notice.html", heading=_("Users"), secret=password,
                 lines=[_("User {name} was created. Give them this password in person; it "
                          "is shown only once, and they set up their second factor at first "
                          "sign-in:").format(name=info.name)],
                 next="/admin/users", nav="admin")


def _admin_action(request: Request, principal: Principal, name: str, action: str) -> Response:
    accounts = _accounts(request)
    address = client_address(request)
    norm = normalise_name(name)
    try:
        if action == "disable":
            if norm == principal.user:
                _ = gettext(request)
                return _users_page(request, 400, _("You cannot disable your own account."))
            accounts.disable(norm, by=principal.user, address=address)
            _store(request).drop_user(norm)
        elif action == "enable":
            accounts.enable(norm, by=principal.user, address=address)
        else:
            accounts.unlock(norm, by=principal.user, address=address)
    except AccountError:
        raise HTTPException(404, "not found") from None
    return _redirect("/admin/users")


@router.post("/admin/users/{name}/disable")
def admin_disable(request: Request, principal: AdminPage, name: str) -> Response:
    return _admin_action(request, principal, name, "disable")


@router.post("/admin/users/{name}/enable")
def admin_enable(request: Request, principal: AdminPage, name: str) -> Response:
    return _admin_action(request, principal, name, "enable")


@router.post("/admin/users/{name}/unlock")
def admin_unlock(request: Request, principal: AdminPage, name: str) -> Response:
    return _admin_action(request, principal, name, "unlock")


BLOCK_PAGES = frozenset({"/admin/users", "/admin/health"})  # where blocks are listed


@router.post("/admin/users/blocks/lift")
def admin_lift_block(request: Request, principal: AdminPage,
                     block: Annotated[str, Form(max_length=32)] = "",
                     back: Annotated[str, Form(max_length=32)] = "") -> Response:
    """Lift one sign-in block listed on the users or health page (``auth.block.lifted``
    event, as ``pacsvault user unlock`` / ``unblock-address``). ``back`` only picks one of
    the pages that list blocks: never an open redirect."""
    if not _accounts(request).lift_block(block, by=principal.user,
                                         address=client_address(request)):
        raise HTTPException(404, "not found")
    return _redirect(back if back in BLOCK_PAGES else "/admin/users")


@router.post("/admin/users/{name}/roles")
def admin_roles(request: Request, principal: AdminPage, name: str,
                roles: Annotated[list[str] | None, Form()] = None) -> Response:
    """Change a user's roles (``user.roles`` event, as ``pacsvault user roles``)."""
    _ = gettext(request)
    norm = normalise_name(name)
    chosen = [r for r in (roles or []) if r in ROLES]
    if norm == principal.user and "admin" not in chosen:
        return _users_page(request, 400,
                           _("You cannot remove your own administrator role."))
    if not chosen:
        return _users_page(request, 400, _("Choose at least one role."))
    accounts = _accounts(request)
    try:
        accounts.get_user(norm)
    except AccountError:
        raise HTTPException(404, "not found") from None
    accounts.set_roles(norm, chosen, by=principal.user, address=client_address(request))
    return _redirect("/admin/users")


@router.post("/admin/users/{name}/reset")
def admin_reset(request: Request, principal: AdminPage, name: str,
                second_factor: Annotated[str, Form(max_length=8)] = "") -> Response:
    _ = gettext(request)
    norm = normalise_name(name)
    try:
        password = _accounts(request).reset(norm, None, second_factor=bool(second_factor),
                                            by=principal.user,
                                            address=client_address(request))
    except AccountError:
        raise HTTPException(404, "not found") from None
    _store(request).drop_user(norm)
    lines = [_("New password for {name}, shown only once. Give it to them in person:")
             .format(name=norm)]
    if second_factor:
        lines.append(_("They will set up a new second factor at their next sign-in."))
    return _page(request, "notice.html", heading=_("Users"), secret=password, lines=lines,
                 next="/admin/users", nav="admin")


@router.get("/health")
def health(request: Request, principal: AdminApi) -> JSONResponse:
    return JSONResponse({
        "status": "ok",
        "users": len(_accounts(request).list_users()),
        "signed_in_sessions": _store(request).signed_in_count(),
    })


@router.get("/admin/openapi.json")
def openapi(request: Request, principal: AdminApi) -> JSONResponse:
    """The OpenAPI document of every route but DICOMweb (PS3.18 documents those), for
    fuzzing; admins only (the app serves no anonymous /openapi.json or /docs)."""
    schema = copy.deepcopy(request.app.openapi())
    schema["info"]["version"] = __version__
    schema["paths"] = {path: item for path, item in schema.get("paths", {}).items()
                       if not path.startswith(pages.DICOMWEB_PREFIX)}
    return JSONResponse(schema)
