"""The Security check page: ``/admin/check``, the last ``pacsvault check`` and "run now".

Shows the kept last complete run (``check-state.json``, written by the nightly job, the
command and this page), its findings by severity with the evidence and the fix in the
reader's language (a finding carries both), and a "run now" button (POST with the
session's CSRF token, admin only) that runs every section in this process, records the
``check.run`` event under the administrator's name and comes back here. Nothing here
carries patient data: findings are ids, counts, paths and settings.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from pacsvault.check.model import Severity
from pacsvault.check.record import load_kept, run_and_record
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import locale_for
from pacsvault.web.kit import AdminPage, page, redirect, vault_of

router = APIRouter()

CHECK = "/admin/check"


@router.get(CHECK)
def check_page(request: Request, principal: AdminPage) -> Response:
    kept = load_kept(vault_of(request).layout.root)
    groups: list[tuple[str, list[object]]] = []
    if kept is not None:
        for severity in (Severity.CRITICAL, Severity.WARNING, Severity.INFO):
            found = [f for f in kept.result.findings if f.severity is severity]
            if found:
                groups.append((severity.value, list(found)))
    return page(request, "admin_check.html", nav="admin", admin_nav="check", kept=kept,
                groups=groups, lang=locale_for(request))


@router.post(f"{CHECK}/run")
def run_now(request: Request, principal: AdminPage) -> Response:
    run_and_record(vault_of(request), trigger="page", user=principal.user,
                   address=client_address(request))
    return redirect(CHECK)
