"""Sign-in, second factor, sessions and account pages; user administration; OpenAPI.

Sign-in is the two steps of ``Accounts`` (see its docstring), each behind its own page, and
each moving the browser to a new session id (``sessions``):

``GET /login`` (anonymous session: a CSRF token for the form) → ``POST /login`` (password)
→ ``/login/enrol`` (first sign-in: QR code, then a code confirms it and the recovery codes
are shown once) or ``/login/second-factor`` (TOTP or recovery code) → signed in.

Every refusal is generic ("wrong user name, password or code"; "too many attempts, try
again in N seconds" with HTTP 429 and ``Retry-After``); the details go to the trail through
``Accounts``. Every page and form route declares who may use it (``PageRole``, a
``deps.RoleRequirement``); the only routes without one are the sign-in steps themselves,
``/`` (a redirect) and the style sheet, and the route inventory test lists them.

Routes are plain functions: FastAPI runs them in its thread pool, where the slow password
hash and the trail's fsync belong.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse
from markupsafe import Markup
from starlette.responses import Response

from pacsvault import __version__
from pacsvault.accounts.models import ROLES
from pacsvault.accounts.passwords import generate_password
from pacsvault.accounts.service import (
    AccountError,
    Accounts,
    AuthOutcome,
    AuthResult,
    PasswordRejected,
    normalise_name,
)
from pacsvault.accounts.throttle import Verdict
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.vault import Vault
from pacsvault.web import pages
from pacsvault.web.deps import RoleRequirement, client_address, require_role
from pacsvault.web.principal import Principal
from pacsvault.web.sessions import (
    SessionStore,
    Stage,
    WebSession,
    account_state,
    clear_cookie_header,
    cookie_header,
)
from pacsvault.web.strings import EN

router = APIRouter()

LOGIN = "/login"
HOME = "/account"
# A password or code longer than this is not one (and must not cost a slow hash).
MAX_SECRET = 1024
MAX_NAME = 256
LOCKED_RETRY_AFTER = 3600  # an admin-only lock has no end; tell clients to come back later
SIGN_IN_LABELS = {"auth.login": "signed_in", "auth.login.failed": "failed",
                  "auth.account.locked": "locked_out", "auth.logout": "signed_out"}
NOTICES = {"password": "notice_password", "token": "notice_token",
           "passkey": "notice_passkey"}
TRAIL_WINDOW = 512 * 1024


class PageRole(RoleRequirement):
    """``RoleRequirement`` for pages: a browser without a session is sent to the sign-in
    form (303) instead of getting a bare 401; API clients (an Authorization header) still
    get 401."""

    async def __call__(self, request: Request) -> Principal:
        try:
            return await super().__call__(request)
        except HTTPException as exc:
            if exc.status_code == 401 and "authorization" not in request.headers:
                raise HTTPException(303, "sign in", headers={"Location": LOGIN}) from None
            raise


SignedIn = Annotated[Principal, Depends(PageRole(None))]
AdminPage = Annotated[Principal, Depends(PageRole("admin"))]
AdminApi = Annotated[Principal, Depends(require_role("admin"))]
FormName = Annotated[str, Form(max_length=MAX_NAME)]
FormSecret = Annotated[str, Form(max_length=MAX_SECRET)]


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


def _page(request: Request, template: str, status: int = 200, *,
          session: WebSession | None = None, headers: dict[str, str] | None = None,
          **context: Any) -> Response:
    current = session or _session(request)
    values: dict[str, Any] = {"csrf": current.csrf if current else "",
                              "principal": _principal(request)}
    values.update(context)
    return pages.render(template, values, status, headers,
                        request.headers.get("accept-language", ""))


def _redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303)


def _set_cookie(response: Response, session_id: str) -> Response:
    response.headers.append("set-cookie", cookie_header(session_id))
    return response


def _emit(request: Request, action: str, user: str, detail: dict[str, str | int | bool],
          outcome: Outcome = Outcome.SUCCESS) -> None:
    _vault(request).recorder.emit(AuditEvent(
        action=action, outcome=outcome, code=EventCode.USER_AUTHENTICATION, actor_user=user,
        actor_address=client_address(request), detail=detail,
    ))


def _throttle_message(result: AuthResult) -> tuple[str, int]:
    """(generic sentence, Retry-After seconds) for a refused or throttled attempt."""
    seconds = math.ceil(result.retry_after)
    locked = result.outcome is AuthOutcome.LOCKED or (
        result.decision is not None and result.decision.verdict is Verdict.LOCKED)
    if locked or seconds <= 0:
        return EN["locked"], seconds if seconds > 0 else LOCKED_RETRY_AFTER
    return EN["throttled"].format(seconds=seconds), seconds


def _locked(result: AuthResult) -> bool:
    return result.outcome is AuthOutcome.LOCKED or (
        result.decision is not None and result.decision.verdict is Verdict.LOCKED)


def _login_page(request: Request, status: int, message: str,
                headers: dict[str, str] | None = None) -> Response:
    """The sign-in form again, on a fresh anonymous session."""
    old = _session(request)
    if old is not None and old.stage is Stage.PENDING:
        _accounts(request).cancel(old.ticket)
    session_id, session = _store(request).rotate(old, Stage.ANONYMOUS,
                                                 client_address(request))
    response = _page(request, "login.html", status, session=session, headers=headers,
                     message=message)
    return _set_cookie(response, session_id)


# --- public: root, style sheet ----------------------------------------------------------


@router.get("/", include_in_schema=False)
def root(request: Request) -> Response:
    return _redirect(HOME if _principal(request) is not None else LOGIN)


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    found = pages.static_file(name)
    if found is None:
        raise HTTPException(404, "not found")
    content, media_type = found
    return Response(content, media_type=media_type)


# --- sign-in ----------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request) -> Response:
    if _principal(request) is not None:
        return _redirect(HOME)
    session = _session(request)
    if session is not None and session.stage is Stage.ANONYMOUS:
        return _page(request, "login.html")
    return _login_page(request, 200, "")


@router.post("/login")
def login(request: Request, name: FormName = "", password: FormSecret = "") -> Response:
    if _principal(request) is not None:
        return _redirect(HOME)
    session = _session(request)
    if session is None:
        # No session, so no CSRF token to check this form against: refuse, offer a new one.
        return _login_page(request, 403, EN["form_expired"])
    accounts = _accounts(request)
    address = client_address(request)
    if session.stage is Stage.PENDING:  # signing in again from the start
        accounts.cancel(session.ticket)
        session.stage, session.ticket, session.user = Stage.ANONYMOUS, "", ""
    result = accounts.authenticate(name, password, address)
    if result.outcome is AuthOutcome.NEEDS_SECOND_FACTOR:
        session_id, _ = _store(request).rotate(
            session, Stage.PENDING, address, user=normalise_name(name), ticket=result.ticket,
            enrolled=result.totp_enrolled)
        target = "/login/second-factor" if result.totp_enrolled else "/login/enrol"
        return _set_cookie(_redirect(target), session_id)
    return _refused(request, result, "login.html")


def _refused(request: Request, result: AuthResult, template: str,
             **context: Any) -> Response:
    """The page for a failed, throttled or locked attempt (generic wording)."""
    if result.outcome in (AuthOutcome.DELAY, AuthOutcome.LOCKED) or _locked(result):
        message, retry = _throttle_message(result)
        headers = {"Retry-After": str(retry)}
        if template != "login.html" and _locked(result):
            # The pending sign-in is over (Accounts cancelled its ticket): start again.
            return _login_page(request, 429, message, headers)
        return _page(request, template, 429, headers=headers, message=message, **context)
    headers = {}
    message = EN["login_failed"]
    if result.decision is not None and not result.decision.allowed:
        wait, retry = _throttle_message(result)
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
        return _login_page(request, 401, EN["sign_in_expired"])
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
        return _login_page(request, 401, EN["sign_in_expired"])
    return _refused(request, result, "enrol.html", **context)


def _signed_in(request: Request, pending: WebSession, result: AuthResult) -> Response:
    """Both factors right (``auth.login`` is recorded by Accounts): a new session id."""
    address = client_address(request)
    state = account_state(_vault(request), result.user)
    session_id, session = _store(request).rotate(
        pending, Stage.SIGNED_IN, address, user=result.user,
        password_changed=state.password_changed if state else None)
    principal = Principal(user=result.user, roles=result.roles, via_token=False,
                          address=address)
    response: Response
    if result.recovery_codes:
        response = _page(request, "codes.html", session=session, principal=principal,
                         codes=result.recovery_codes)
    elif result.recovery_codes_left is not None:
        response = _page(request, "notice.html", session=session, principal=principal,
                         heading=EN["sign_in"], secret="", next=HOME,
                         lines=[EN["recovery_left"].format(left=result.recovery_codes_left)])
    else:
        response = _redirect(HOME)
    return _set_cookie(response, session_id)


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
    """
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
    found: list[dict[str, str]] = []
    for line in reversed(lines):
        try:
            body = json.loads(line)
        except ValueError:
            continue
        if not isinstance(body, dict) or body.get("user") != user:
            continue
        label = SIGN_IN_LABELS.get(str(body.get("action", "")))
        if label is None:
            continue
        when = str(body.get("time", ""))[:19].replace("T", " ")
        found.append({"time": f"{when} UTC", "address": str(body.get("address", "")),
                      "outcome": EN[label]})
        if len(found) >= limit:
            break
    return found


def _account_page(request: Request, principal: Principal, status: int = 200,
                  message: str = "", message_kind: str = "error") -> Response:
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
    return _page(request, "account.html", status, user=info, tokens=tokens,
                 tok_status=token_status, sign_ins=sign_ins, message=message,
                 message_kind=message_kind, passkeys=passkeys)


@router.get("/account")
def account(request: Request, principal: SignedIn, notice: str = "") -> Response:
    text = EN[NOTICES[notice]] if notice in NOTICES else ""
    return _account_page(request, principal, message=text, message_kind="ok")


@router.post("/account/password")
def change_password(request: Request, principal: SignedIn, current: FormSecret = "",
                    new: FormSecret = "", repeat: FormSecret = "") -> Response:
    accounts = _accounts(request)
    address = client_address(request)
    if new != repeat:
        return _account_page(request, principal, 400, EN["password_mismatch"])
    # The current password goes through sign-in's first step: throttled and recorded like
    # any guess, so a borrowed session cannot be used to try passwords.
    check = accounts.authenticate(principal.user, current, address)
    if check.outcome in (AuthOutcome.DELAY, AuthOutcome.LOCKED):
        message, retry = _throttle_message(check)
        response = _account_page(request, principal, 429, message)
        response.headers["Retry-After"] = str(retry)
        return response
    if check.outcome is not AuthOutcome.NEEDS_SECOND_FACTOR:
        return _account_page(request, principal, 400, EN["password_wrong"])
    accounts.cancel(check.ticket)
    try:
        accounts.reset(principal.user, new, by=principal.user, address=address)
    except PasswordRejected as exc:
        return _account_page(request, principal, 400, "; ".join(exc.problems))
    session = _session(request)
    state = account_state(_vault(request), principal.user)
    if session is not None and state is not None:
        session.password_changed = state.password_changed
    _store(request).drop_user(principal.user, keep=session)
    return _redirect(f"{HOME}?notice=password")


@router.post("/account/recovery-codes")
def new_recovery_codes(request: Request, principal: SignedIn) -> Response:
    codes = _accounts(request).new_recovery_codes(principal.user, by=principal.user,
                                                  address=client_address(request))
    return _page(request, "codes.html", codes=codes)


@router.post("/account/tokens/{token_id}/revoke")
def revoke_own_token(request: Request, principal: SignedIn, token_id: str) -> Response:
    accounts = _accounts(request)
    if token_id not in {t.token_id for t in accounts.list_tokens(principal.user)}:
        raise HTTPException(404, "not found")
    accounts.revoke_token(token_id, by=principal.user, address=client_address(request))
    return _redirect(f"{HOME}?notice=token")


# --- administration ---------------------------------------------------------------------


def _users_page(request: Request, status: int = 200, message: str = "") -> Response:
    return _page(request, "admin_users.html", status, users=_accounts(request).list_users(),
                 roles=ROLES, message=message)


@router.get("/admin/users")
def admin_users(request: Request, principal: AdminPage) -> Response:
    return _users_page(request)


@router.post("/admin/users")
def admin_add_user(request: Request, principal: AdminPage, name: FormName = "",
                   roles: Annotated[list[str] | None, Form()] = None) -> Response:
    password = generate_password()
    try:
        info = _accounts(request).add_user(name, roles or [], password, by=principal.user,
                                           address=client_address(request))
    except AccountError as exc:
        return _users_page(request, 400, str(exc))
    return _page(request, "notice.html", heading=EN["users"], secret=password,
                 lines=[EN["user_created"].format(name=info.name)], next="/admin/users")


def _admin_action(request: Request, principal: Principal, name: str, action: str) -> Response:
    accounts = _accounts(request)
    address = client_address(request)
    norm = normalise_name(name)
    try:
        if action == "disable":
            if norm == principal.user:
                return _users_page(request, 400, EN["cannot_disable_self"])
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


@router.post("/admin/users/{name}/reset")
def admin_reset(request: Request, principal: AdminPage, name: str,
                second_factor: Annotated[str, Form(max_length=8)] = "") -> Response:
    norm = normalise_name(name)
    try:
        password = _accounts(request).reset(norm, None, second_factor=bool(second_factor),
                                            by=principal.user,
                                            address=client_address(request))
    except AccountError:
        raise HTTPException(404, "not found") from None
    _store(request).drop_user(norm)
    lines = [EN["password_reset"].format(name=norm)]
    if second_factor:
        lines.append(EN["second_factor_reset"])
    return _page(request, "notice.html", heading=EN["users"], secret=password, lines=lines,
                 next="/admin/users")


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
