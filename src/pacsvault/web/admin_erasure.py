"""Patient erasure and retention: ``/admin/erasure``, the web face of ``pacsvault patient``.

An administrator sees the patients whose retention period has ended (the only place, with
the command line, where that list exists: the daily job records a count), finds a patient
by ID, and asks for an erasure with a reason and a legal basis. A *second* administrator,
signed in with their own second factor, sees the pending request here and confirms it:
then ``storage.erasure`` destroys the patient's data keys, rows and files in this process
(the server's caches drop at once) and writes the tombstone. The requester cannot confirm
their own request. A solo practice (``[retention] solo_practice = true`` and a single
administrator account) erases alone, typing the patient ID again.

Every action is an event (``patient.erasure.requested|cancelled``, ``patient.erased``);
showing the list of expired patients is recorded as a query (counts only: sealed references
to patients about to be erased would outlive them). Forms carry the session's CSRF token
(checked by ``sessions``); every route is admin-only (``PageRole("admin")``).
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.storage.erasure import (
    LEGAL_BASES,
    RETENTION_ENDED,
    Eraser,
    ErasureError,
    ErasureRequest,
    RetentionRunning,
    Target,
)
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_, Gettext, gettext
from pacsvault.web.kit import (
    AdminPage,
    FormReason,
    FormValue,
    accounts_of,
    page,
    redirect,
    vault_of,
)

router = APIRouter()

ERASURE = "/admin/erasure"
BASIS_NAMES = {
    "retention-ended": N_("Retention period over"),
    "patient-request": N_("Patient's request, no legal obligation to keep"),
    "wrong-patient": N_("Images of another person, or sent in error"),
    "unlawful": N_("Unlawfully processed"),
    "legal-obligation": N_("Legal obligation or court order to erase"),
}
NOTICES = {
    "requested": N_("Erasure request %(request)s recorded: another administrator must "
                    "confirm it."),
    "cancelled": N_("Erasure request %(request)s cancelled."),
    "done": N_("Erasure request %(request)s done: the patient's keys, images and records "
               "are destroyed."),
}


def _eraser(request: Request) -> Eraser:
    vault = vault_of(request)
    return Eraser(vault, vault.archive, accounts_of(request))


def _message(exc: ErasureError, _: Gettext) -> str:
    if isinstance(exc, RetentionRunning):
        return _("The retention period of this patient has not ended: choose the legal "
                 "reason that allows the erasure now, and explain it.")
    text = str(exc)
    known = {
        "no patient has this ID (and issuer)": _("No patient has this ID (and issuer)."),
        "a reason is required (it is recorded with the erasure)":
            _("Enter the reason: it is recorded with the erasure."),
        "the patient ID typed again differs; nothing was erased":
            _("The patient ID typed again differs: nothing was erased."),
    }
    if text.startswith("the administrator who asked cannot confirm"):
        return _("You asked for this erasure: another administrator must confirm it.")
    if text.startswith("no pending erasure request"):
        return _("This request is no longer pending (done, cancelled, or older than a "
                 "week).")
    if "solo_practice" in text or "several administrators" in text:
        return _("A second administrator must confirm erasures in this practice.")
    return known.get(text, _("This cannot be done: check the patient ID, the reason and "
                             "the legal basis."))


def _erasure_page(request: Request, *, patient_id: str = "", issuer: str = "",
                  target: Target | None = None, message: str = "", kind: str = "error",
                  status: int = 200, reason: str = "", basis: str = "") -> Response:
    eraser = _eraser(request)
    eraser.finish_pending()  # files of an erasure a crash interrupted
    expired = eraser.expired()
    vault_of(request).recorder.emit(AuditEvent(
        action="patient.retention.listed", outcome=Outcome.SUCCESS, code=EventCode.QUERY,
        actor_user=getattr(getattr(request.state, "principal", None), "user", ""),
        actor_address=client_address(request),
        message=(f"An administrator viewed the erasure page: {len(expired)} patient(s) past "
                 "their retention period listed."),
        detail={"expired": len(expired), "looked_up": target is not None},
    ))
    rules = eraser.rules
    solo = rules.solo_practice and len(eraser.admins()) <= 1
    return page(request, "admin_erasure.html", status, nav="admin", admin_nav="erasure",
                patient_id=patient_id, issuer=issuer, target=target, message=message,
                message_kind=kind, reason=reason, basis=basis or RETENTION_ENDED,
                bases=list(LEGAL_BASES), basis_names=BASIS_NAMES, expired=expired,
                pending=eraser.requests(pending_only=True),
                recent=[r for r in eraser.requests(limit=20) if r.status != "pending"],
                solo=solo, me=getattr(getattr(request.state, "principal", None), "user", ""),
                rules=rules)


@router.get(ERASURE)
def erasure_page(request: Request, principal: AdminPage, patient_id: str = "",
                 issuer: str = "", notice: str = "", request_id: str = "") -> Response:
    _ = gettext(request)
    text = ""
    if notice in NOTICES and request_id.isdigit():
        # Only a notice the index confirms (a crafted link cannot announce anything).
        with vault_of(request).sessions() as s:
            row = s.get(ErasureRequest, int(request_id))
        wanted = {"requested": "pending", "cancelled": "cancelled", "done": "done"}[notice]
        if row is not None and row.status == wanted:
            text = _(NOTICES[notice]) % {"request": row.id}
    target: Target | None = None
    if patient_id.strip():
        try:
            target = _eraser(request).find(patient_id[:64], issuer[:64])
        except ErasureError as exc:
            return _erasure_page(request, patient_id=patient_id, issuer=issuer, status=404,
                                 message=_message(exc, _))
    return _erasure_page(request, patient_id=patient_id.strip(), issuer=issuer.strip(),
                         target=target, message=text, kind="ok")


def _again(request: Request, exc: ErasureError, patient_id: str, issuer: str, reason: str,
           basis: str) -> Response:
    _ = gettext(request)
    target = None
    try:
        target = _eraser(request).find(patient_id, issuer) if patient_id.strip() else None
    except ErasureError:
        target = None
    return _erasure_page(request, patient_id=patient_id, issuer=issuer, target=target,
                         status=400, reason=reason, basis=basis, message=_message(exc, _))


@router.post(f"{ERASURE}/request")
def request_erasure(request: Request, principal: AdminPage, patient_id: FormValue = "",
                    issuer: FormValue = "", reason: FormReason = "",
                    basis: FormValue = "") -> Response:
    try:
        request_id = _eraser(request).request(patient_id, issuer, reason, basis,
                                              actor=principal.user,
                                              address=client_address(request))
    except ErasureError as exc:
        return _again(request, exc, patient_id, issuer, reason, basis)
    return redirect(f"{ERASURE}?{urlencode({'notice': 'requested', 'request_id': request_id})}")


@router.post(f"{ERASURE}/expired")
def request_expired(request: Request, principal: AdminPage, reason: FormReason = "") -> Response:
    try:
        request_id = _eraser(request).request_expired(
            reason or "retention period over", actor=principal.user,
            address=client_address(request))
    except ErasureError as exc:
        return _again(request, exc, "", "", reason, RETENTION_ENDED)
    return redirect(f"{ERASURE}?{urlencode({'notice': 'requested', 'request_id': request_id})}")


def _request_number(value: str) -> int:
    if not value.isdigit() or len(value) > 12:
        raise ErasureError("no pending erasure request has this number")
    return int(value)


@router.post(f"{ERASURE}/confirm")
def confirm_erasure(request: Request, principal: AdminPage, request_id: FormValue = "",
                    confirm: FormValue = "") -> Response:
    _ = gettext(request)
    if not confirm:
        return _erasure_page(request, status=400, message=_(
            "Tick the box to confirm: an erasure cannot be undone."))
    try:
        result = _eraser(request).confirm(_request_number(request_id), actor=principal.user,
                                          address=client_address(request), via="web")
    except ErasureError as exc:
        return _erasure_page(request, status=400, message=_message(exc, _))
    return redirect(f"{ERASURE}?{urlencode({'notice': 'done', 'request_id': result.request})}")


@router.post(f"{ERASURE}/cancel")
def cancel_erasure(request: Request, principal: AdminPage, request_id: FormValue = "") -> Response:
    _ = gettext(request)
    try:
        number = _request_number(request_id)
        _eraser(request).cancel(number, actor=principal.user, address=client_address(request))
    except ErasureError as exc:
        return _erasure_page(request, status=400, message=_message(exc, _))
    return redirect(f"{ERASURE}?{urlencode({'notice': 'cancelled', 'request_id': number})}")


@router.post(f"{ERASURE}/solo")
def solo_erasure(request: Request, principal: AdminPage, patient_id: FormValue = "",
                 issuer: FormValue = "", reason: FormReason = "", basis: FormValue = "",
                 typed_again: FormValue = "") -> Response:
    try:
        result = _eraser(request).erase_solo(patient_id, issuer, reason, basis, typed_again,
                                             actor=principal.user,
                                             address=client_address(request), via="web")
    except ErasureError as exc:
        return _again(request, exc, patient_id, issuer, reason, basis)
    return redirect(f"{ERASURE}?{urlencode({'notice': 'done', 'request_id': result.request})}")
