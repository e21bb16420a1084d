"""The signed-in user's own account page: password, language, recovery codes, API tokens,
the latest sign-ins (read from the end of the trail), passkeys (their routes are
``passkey_routes``, which shows this page again through ``account_page``).

Changing the password asks for the current one through sign-in's first step (throttled
and recorded like any guess) and signs the user's other sessions out.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from starlette.responses import Response

from pacsvault.accounts import preferences
from pacsvault.accounts.service import AccountError, AuthOutcome, PasswordRejected
from pacsvault.audit.tail import TRAIL_WINDOW, tail_records
from pacsvault.web import i18n, share_pages
from pacsvault.web.alert_notices import recent_alerts
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_, Gettext
from pacsvault.web.kit import (
    ACCOUNT,
    FormSecret,
    SignedIn,
    accounts_of,
    device_of,
    gettext,
    page,
    redirect,
    session_of,
    store_of,
    vault_of,
)
from pacsvault.web.principal import Principal
from pacsvault.web.sessions import account_state
from pacsvault.web.signin import throttle_message

router = APIRouter()

SIGN_IN_LABELS = {"auth.login": N_("signed in"), "auth.login.failed": N_("failed"),
                  "auth.account.locked": N_("account locked"),
                  "auth.logout": N_("signed out")}
NOTICES = {"password": N_("Your password was changed. Your other sessions were signed out."),
           "token": N_("The token was revoked."),
           "passkey": N_("The passkey was removed."),
           "language": N_("Your language was saved.")}


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
                      "outcome": label, "at": str(body.get("time", ""))})  # local: |when
        if len(found) >= limit:
            break
    return found


def account_page(request: Request, principal: Principal, status: int = 200,
                 message: str = "", message_kind: str = "error",
                 field_errors: dict[str, str] | None = None) -> Response:
    accounts = accounts_of(request)
    info = accounts.get_user(principal.user)
    tokens = accounts.list_tokens(principal.user)
    now = accounts.throttle.now()
    token_status = {t.token_id: t.status(now) for t in tokens}
    sign_ins = recent_sign_ins(vault_of(request).audit.path, principal.user)
    passkeys = request.app.state.passkeys.list_passkeys(principal.user)
    preference = i18n.normalise(getattr(request.state, "language", ""))
    notifications = (recent_alerts(vault_of(request).audit.path, dt.datetime.now(dt.UTC))
                     if "admin" in principal.roles else None)  # issue 19
    return page(request, "account.html", status, user=info, tokens=tokens,
                notifications=notifications,
                tok_status=token_status, sign_ins=sign_ins, message=message,
                message_kind=message_kind, passkeys=passkeys, preference=preference,
                field_errors=field_errors or {}, nav="account",
                my_shares=share_pages.account_shares(request, principal))  # issue 19


@router.get("/account")
def account(request: Request, principal: SignedIn, notice: str = "") -> Response:
    text = gettext(request)(NOTICES[notice]) if notice in NOTICES else ""
    return account_page(request, principal, message=text, message_kind="ok")


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
    accounts = accounts_of(request)
    address = client_address(request)
    if new != repeat:
        text = _("The two new passwords differ.")
        return account_page(request, principal, 400, text, field_errors={"repeat": text})
    # The current password goes through sign-in's first step: throttled and recorded like
    # any guess, so a borrowed session cannot be used to try passwords.
    check = accounts.authenticate(principal.user, current, address, device_of(request))
    if check.outcome in (AuthOutcome.DELAY, AuthOutcome.LOCKED):
        message, retry = throttle_message(check, _)
        response = account_page(request, principal, 429, message)
        response.headers["Retry-After"] = str(retry)
        return response
    if check.outcome is not AuthOutcome.NEEDS_SECOND_FACTOR:
        text = _("The current password is wrong.")
        return account_page(request, principal, 400, text, field_errors={"current": text})
    accounts.cancel(check.ticket)
    verdict = accounts.check_password(new, principal.user)
    if not verdict.ok:
        text = " ".join(password_problems(verdict.codes, verdict.bits, verdict.required_bits,
                                          _))
        return account_page(request, principal, 400, text, field_errors={"new": text})
    try:
        accounts.reset(principal.user, new, by=principal.user, address=address)
    except PasswordRejected:
        text = _("The password is not accepted.")
        return account_page(request, principal, 400, text, field_errors={"new": text})
    session = session_of(request)
    state = account_state(vault_of(request), principal.user)
    if session is not None and state is not None:
        session.password_changed = state.password_changed
        store_of(request).save(session)
    store_of(request).drop_user(principal.user, keep=session)
    return redirect(f"{ACCOUNT}?notice=password")


@router.post("/account/language")
def change_language(request: Request, principal: SignedIn,
                    lang: Annotated[str, Form(max_length=8)] = "") -> Response:
    """The user's language ("" = as the browser asks), kept with the account."""
    language = i18n.normalise(lang)
    preferences.set_language(vault_of(request).sessions, principal.user, language)
    response = redirect(f"{ACCOUNT}?notice=language")
    if language:  # the sign-in page, after signing out, speaks it too
        response.headers.append("set-cookie", i18n.cookie_header(language))
    return response


@router.post("/account/recovery-codes")
def new_recovery_codes(request: Request, principal: SignedIn) -> Response:
    _ = gettext(request)
    try:
        codes = accounts_of(request).new_recovery_codes(principal.user, by=principal.user,
                                                        address=client_address(request))
    except AccountError:
        return account_page(request, principal, 400, _("Set up a second factor first."))
    return page(request, "codes.html", codes=codes, next=ACCOUNT)


_CODE = re.compile(r"^[0-9A-Z-]{4,40}$")
MAX_CODES = 32


@router.post("/account/recovery-codes/download")
def download_recovery_codes(
        request: Request, principal: SignedIn,
        codes: Annotated[list[str] | None, Form()] = None) -> Response:
    """The codes the page shows, as a text file (issue 20, item 8).

    The codes are stored hashed, so the page sends back the ones it shows (in hidden
    fields, CSRF-checked like every form): the file is made from them, kept nowhere, never
    cached. Anything that is not a code's shape is refused rather than written in a file.
    """
    found = [c.strip() for c in (codes or [])]
    if not found or len(found) > MAX_CODES or not all(_CODE.match(c) for c in found):
        raise HTTPException(400, "invalid request")
    _ = gettext(request)
    text = "\n".join([_("pacsvault recovery codes for {user}. Each code signs you in once; "
                        "keep them somewhere safe.").format(user=principal.user), "",
                       *found, ""])
    return Response(text.encode(), media_type="text/plain; charset=utf-8", headers={
        "Content-Disposition": 'attachment; filename="pacsvault-recovery-codes.txt"',
        "Cache-Control": "no-store"})


@router.post("/account/tokens/{token_id}/revoke")
def revoke_own_token(request: Request, principal: SignedIn, token_id: str) -> Response:
    accounts = accounts_of(request)
    if token_id not in {t.token_id for t in accounts.list_tokens(principal.user)}:
        raise HTTPException(404, "not found")
    accounts.revoke_token(token_id, by=principal.user, address=client_address(request))
    return redirect(f"{ACCOUNT}?notice=token")

