"""Administration of users: create (a generated password shown once), disable, enable,
unlock, roles, password or second-factor reset, and lifting sign-in blocks.

Admin-only (``kit.AdminPage``); every change is an event recorded by ``Accounts``. An
administrator cannot disable themselves or drop their own administrator role.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from starlette.responses import Response

from pacsvault.accounts.models import ROLES
from pacsvault.accounts.passwords import generate_password
from pacsvault.accounts.service import (
    AccountError,
    PasswordRejected,
    check_name,
    normalise_name,
)
from pacsvault.web.deps import client_address
from pacsvault.web.kit import (
    AdminPage,
    FormName,
    accounts_of,
    gettext,
    page,
    redirect,
    store_of,
)
from pacsvault.web.principal import Principal

router = APIRouter()


def _users_page(request: Request, status: int = 200, message: str = "",
                field_errors: dict[str, str] | None = None,
                values: dict[str, Any] | None = None) -> Response:
    accounts = accounts_of(request)
    return page(request, "admin_users.html", status, users=accounts.list_users(),
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
        info = accounts_of(request).add_user(name, chosen, password, by=principal.user,
                                             address=client_address(request))
    except AccountError as exc:
        field, text = _user_error(request, exc, name)
        return _users_page(request, 400, text, {field: text},
                           {"name": name, "roles": chosen})
    return page(request, "notice.html", heading=_("Users"), secret=password,
                lines=[_("User {name} was created. Give them this password in person; it "
                         "is shown only once, and they set up their second factor at first "
                         "sign-in:").format(name=info.name)],
                next="/admin/users", nav="admin")


def _admin_action(request: Request, principal: Principal, name: str, action: str) -> Response:
    accounts = accounts_of(request)
    address = client_address(request)
    norm = normalise_name(name)
    try:
        if action == "disable":
            if norm == principal.user:
                _ = gettext(request)
                return _users_page(request, 400, _("You cannot disable your own account."))
            accounts.disable(norm, by=principal.user, address=address)
            store_of(request).drop_user(norm)
        elif action == "enable":
            accounts.enable(norm, by=principal.user, address=address)
        else:
            accounts.unlock(norm, by=principal.user, address=address)
    except AccountError:
        raise HTTPException(404, "not found") from None
    return redirect("/admin/users")


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
    if not accounts_of(request).lift_block(block, by=principal.user,
                                           address=client_address(request)):
        raise HTTPException(404, "not found")
    return redirect(back if back in BLOCK_PAGES else "/admin/users")


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
    accounts = accounts_of(request)
    try:
        accounts.get_user(norm)
    except AccountError:
        raise HTTPException(404, "not found") from None
    accounts.set_roles(norm, chosen, by=principal.user, address=client_address(request))
    return redirect("/admin/users")


@router.post("/admin/users/{name}/reset")
def admin_reset(request: Request, principal: AdminPage, name: str,
                second_factor: Annotated[str, Form(max_length=8)] = "") -> Response:
    _ = gettext(request)
    norm = normalise_name(name)
    try:
        password = accounts_of(request).reset(norm, None, second_factor=bool(second_factor),
                                              by=principal.user,
                                              address=client_address(request))
    except AccountError:
        raise HTTPException(404, "not found") from None
    store_of(request).drop_user(norm)
    lines = [_("New password for {name}, shown only once. Give it to them in person:")
             .format(name=norm)]
    if second_factor:
        lines.append(_("They will set up a new second factor at their next sign-in."))
    return page(request, "notice.html", heading=_("Users"), secret=password, lines=lines,
                next="/admin/users", nav="admin")

