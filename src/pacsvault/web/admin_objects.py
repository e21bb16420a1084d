"""Removing a bad object: ``/admin/objects``, the web face of ``pacsvault study|series|
instance delete`` and ``instance quarantine|unquarantine``.

The admin names the object by its UID (study, series or instance: no patient browsing, and
no patient name on the page), sees what would go (counts, modalities, whether the patient's
data key would be destroyed), and deletes it or puts an instance in quarantine with a
reason. Same code (``storage.removal``), same events and records as the command line, with
the admin's user name and address as actor; the deletion runs in this process, so the
server's caches are dropped at once.

A delete form carries the number of instances and the crypto-shredding flag the admin saw:
if the object changed since (more images arrived), nothing is deleted and the page shows it
again. UIDs travel in the query string of the search (like QIDO-RS; no access log is kept)
and in form fields.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from pacsvault.index.models import ObjectAction
from pacsvault.storage.removal import (
    LEVELS,
    NotFound,
    Plan,
    RemovalError,
    Remover,
    check_level,
    check_uid,
)
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_, Gettext, gettext
from pacsvault.web.kit import AdminPage, FormReason, FormValue, page, redirect, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()

OBJECTS = "/admin/objects"
LEVEL_NAMES = {"study": N_("Study"), "series": N_("Series"), "instance": N_("Instance")}
NOTICES = {
    "delete": N_("Deleted: %(count)s image(s), removal record %(record)s."),
    "quarantine": N_("The instance is in quarantine: hidden from searches and retrieval, "
                     "kept (removal record %(record)s)."),
    "release": N_("The instance was released from quarantine: visible again (removal "
                  "record %(record)s)."),
}


def _remover(request: Request) -> Remover:
    vault = vault_of(request)
    return Remover(vault.engine, vault.store, vault.recorder, vault.archive)


def _message(exc: RemovalError, _: Gettext) -> str:
    text = str(exc)
    known = {
        "a reason is required (it is recorded with the removal)":
            _("Enter the reason: it is recorded with the removal."),
        "no such study": _("No study has this UID."),
        "no such series": _("No series has this UID."),
        "no such instance": _("No instance has this UID."),
        "the instance is already in quarantine": _("The instance is already in quarantine."),
        "the instance is not in quarantine": _("The instance is not in quarantine."),
        "the object changed since it was shown; nothing was deleted: look at it again":
            _("The object changed since it was shown (images arrived?): nothing was "
              "deleted. Check it again below."),
    }
    return known.get(text, _("This cannot be done: check the UID and the reason."))


def _objects_page(request: Request, *, level: str = "study", uid: str = "",
                  plan: Plan | None = None, message: str = "", kind: str = "error",
                  status: int = 200, reason: str = "") -> Response:
    remover = _remover(request)
    remover.finish_pending()  # files of a removal a crash interrupted
    return page(request, "admin_objects.html", status, nav="admin", admin_nav="objects",
                levels=LEVELS, level_names=LEVEL_NAMES, level=level, uid=uid, plan=plan,
                message=message, message_kind=kind, reason=reason,
                quarantined=remover.quarantined(), recent=remover.recent())


@router.get(OBJECTS)
def objects_page(request: Request, principal: AdminPage, level: str = "study",
                 uid: str = "", notice: str = "", record: str = "") -> Response:
    _ = gettext(request)
    text, kind = "", "ok"
    if notice in NOTICES and record.isdigit():
        # Only a notice the index confirms (a crafted link cannot announce anything).
        with vault_of(request).sessions() as s:
            row = s.get(ObjectAction, int(record))
        if row is not None and row.action == notice:
            text = _(NOTICES[notice]) % {"count": row.instances, "record": row.id}
    if level not in LEVELS:
        level = "study"
    plan: Plan | None = None
    if uid.strip():
        try:
            plan = _remover(request).plan(level, uid)
        except RemovalError as exc:
            return _objects_page(request, level=level, uid=uid, status=404,
                                 message=_message(exc, _))
    return _objects_page(request, level=level, uid=uid.strip(), plan=plan, message=text,
                         kind=kind)


@router.post(f"{OBJECTS}/delete")
def delete_object(request: Request, principal: AdminPage, level: FormValue = "",
                  uid: FormValue = "", reason: FormReason = "", instances: FormValue = "",
                  shred: FormValue = "", confirm: FormValue = "") -> Response:
    _ = gettext(request)
    remover = _remover(request)
    try:
        level, uid = check_level(level), check_uid(uid)
        plan = remover.plan(level, uid)
    except NotFound as exc:
        return _objects_page(request, level=level if level in LEVELS else "study", uid=uid,
                             status=404, message=_message(exc, _))
    except RemovalError as exc:
        return _objects_page(request, status=400, message=_message(exc, _))
    if str(plan.instances) != instances or bool(plan.keys_destroyed) != bool(shred):
        return _objects_page(request, level=level, uid=uid, plan=plan, status=409,
                             reason=reason, message=_(
                                 "The object changed since it was shown (images arrived?): "
                                 "nothing was deleted. Check it again below."))
    if not confirm:
        return _objects_page(request, level=level, uid=uid, plan=plan, status=400,
                             reason=reason, message=_(
                                 "Tick the box to confirm: a deletion cannot be undone."))
    try:
        done = remover.delete(level, uid, reason, actor=principal.user,
                              address=client_address(request), via="web", expected=plan)
    except RemovalError as exc:
        return _objects_page(request, level=level, uid=uid, plan=plan, status=400,
                             reason=reason, message=_message(exc, _))
    return redirect(f"{OBJECTS}?{urlencode({'notice': 'delete', 'record': done.action_id})}")


def _quarantine(request: Request, principal: Principal, uid: str, reason: str,
                hide: bool) -> Response:
    _ = gettext(request)
    remover = _remover(request)
    try:
        uid = check_uid(uid)
        change = (remover.quarantine if hide else remover.release)(
            uid, reason, actor=principal.user, address=client_address(request), via="web")
    except NotFound as exc:
        return _objects_page(request, level="instance", uid=uid, status=404,
                             message=_message(exc, _))
    except RemovalError as exc:
        plan = None
        with contextlib.suppress(RemovalError):
            plan = remover.plan("instance", uid)
        return _objects_page(request, level="instance", uid=uid, plan=plan, status=400,
                             reason=reason, message=_message(exc, _))
    notice = "quarantine" if hide else "release"
    return redirect(f"{OBJECTS}?{urlencode({'notice': notice, 'record': change.action_id})}")


@router.post(f"{OBJECTS}/quarantine")
def quarantine_object(request: Request, principal: AdminPage, uid: FormValue = "",
                      reason: FormReason = "") -> Response:
    return _quarantine(request, principal, uid, reason, True)


@router.post(f"{OBJECTS}/release")
def release_object(request: Request, principal: AdminPage, uid: FormValue = "",
                   reason: FormReason = "") -> Response:
    return _quarantine(request, principal, uid, reason, False)

