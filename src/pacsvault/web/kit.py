"""The page toolkit shared by every HTML page of the web layer.

What a page route needs besides its own logic: the role requirement that sends a browser
without a session to the sign-in form (``PageRole``, with ``next`` kept: ``safe_next``,
``login_url``), the form field limits, the app's shared objects (``vault_of``,
``accounts_of``, ``store_of``), the request's session and principal, and ``page`` (a
template rendered with the CSRF token, the principal and the request's language) and
``redirect`` (303 after a form).

Every page module (``signin``, ``account``, ``admin_users``, ``admin_nodes``,
``admin_objects``, ``admin_erasure``, ``admin_health``, ``audit_page``, ``passkey_routes``)
imports these public names; none of them holds routes of its own here.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from pacsvault.accounts.service import Accounts
from pacsvault.vault import Vault
from pacsvault.web import alert_names, formats, i18n, pages
from pacsvault.web.deps import RoleRequirement, require_role
from pacsvault.web.i18n import N_, Gettext
from pacsvault.web.principal import Principal
from pacsvault.web.sessions import DEVICE_COOKIE, SessionStore, WebSession

LOGIN = "/login"
HOME = "/"  # the study list
ACCOUNT = "/account"
# A password or code longer than this is not one (and must not cost a slow hash).
MAX_SECRET = 1024
MAX_NAME = 256
MAX_NEXT = 2048
ROLE_NAMES = {"physician": N_("physician"), "admin": N_("administrator"),
              "auditor": N_("auditor")}


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
# The administration forms: a UID, a patient ID, a choice; a reason kept in the records.
FormValue = Annotated[str, Form(max_length=128)]
FormReason = Annotated[str, Form(max_length=2000)]


def vault_of(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


def accounts_of(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def store_of(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.web_sessions
    return store


def session_of(request: Request) -> WebSession | None:
    session: WebSession | None = getattr(request.state, "web_session", None)
    return session


def principal_of(request: Request) -> Principal | None:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal


def device_of(request: Request) -> str:
    """The browser's known-device cookie (``accounts.devices``), or ""."""
    return request.cookies.get(DEVICE_COOKIE, "")[:64]


def gettext(request: Request) -> Gettext:
    return i18n.gettext(request)


def page(request: Request, template: str, status: int = 200, *,
         session: WebSession | None = None, headers: dict[str, str] | None = None,
         **context: Any) -> Response:
    current = session or session_of(request)
    principal = principal_of(request)
    values: dict[str, Any] = {"csrf": current.csrf if current else "",
                              "principal": principal,
                              "here": request.url.path, "role_names": ROLE_NAMES,
                              "tz": formats.zone(vault_of(request).settings.web.time_zone),
                              "alert_rules": alert_names.RULES,
                              "alert_levels": alert_names.LEVELS}
    if principal is not None and "admin" in principal.roles:  # alerts seen (issue 19)
        from pacsvault.web.alert_notices import admin_banner

        values["admin_alerts"] = admin_banner(vault_of(request).audit.path,
                                              dt.datetime.now(dt.UTC))
    values.update(context)
    return pages.render(template, values, status, headers, i18n.locale_for(request))


def redirect(url: str) -> Response:
    return RedirectResponse(url, status_code=303)
