"""The auditor's page: ``/audit``, the web face of ``pacsvault audit show``.

``GET /audit`` shows the filter form and the latest records; the form is sent with POST
(and its CSRF token) so that a Patient ID never ends up in a URL, a browser history or a
proxy log. Both use ``audit.query.select_records``, the CLI's own filtering. Reading the
accesses to a patient or a study is recorded (``audit.show``), as on the command line.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from starlette.responses import Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.query import AuditFilter, select_records
from pacsvault.audit.trail import Record
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import gettext
from pacsvault.web.kit import PageRole, page, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()

AuditorPage = Annotated[Principal, Depends(PageRole("auditor"))]
FormField = Annotated[str, Form(max_length=256)]
SHOWN = 1000  # newest first; narrow the filters to see older ones
FIELDS = ("patient", "study", "user", "node", "action", "since", "until")


def _when(text: str) -> dt.datetime | None:
    if not text:
        return None
    value = dt.datetime.fromisoformat(text)  # ValueError: not a date
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _row(rec: Record) -> dict[str, Any]:
    details = " ".join(f"{k}={v}" for k, v in rec.detail.items())
    if rec.message:
        details = f"{details} -- {rec.message}" if details else rec.message
    return {"time": rec.time[:19].replace("T", " "), "action": rec.action,
            "outcome": rec.outcome, "who": rec.actor_user or rec.actor_ae or "-",
            "address": rec.actor_address, "details": details,
            "studies": len(rec.refs.get("study_uids", []))}


def _audit_page(request: Request, values: dict[str, str], records: list[Record],
                status: int = 200, message: str = "") -> Response:
    rows = [_row(r) for r in reversed(records[-SHOWN:])]
    return page(request, "audit.html", status, values=values, rows=rows,
                total=len(records), shown=len(rows), message=message, nav="audit",
                field_errors={"since": message} if message else {})


@router.get("/audit")
def audit_page(request: Request, principal: AuditorPage) -> Response:
    records = select_records(vault_of(request), AuditFilter())
    return _audit_page(request, dict.fromkeys(FIELDS, ""), records)


@router.post("/audit")
def audit_search(request: Request, principal: AuditorPage, patient: FormField = "",
                 study: FormField = "", user: FormField = "", node: FormField = "",
                 action: FormField = "", since: FormField = "",
                 until: FormField = "") -> Response:
    values = {"patient": patient.strip(), "study": study.strip(), "user": user.strip(),
              "node": node.strip(), "action": action.strip(), "since": since.strip(),
              "until": until.strip()}
    try:
        start, end = _when(values["since"]), _when(values["until"])
    except ValueError:
        _ = gettext(request)
        return _audit_page(request, values, [], 400, _(
            "Dates must be ISO dates, such as 2024-01-31 or 2024-01-31T08:00."))
    flt = AuditFilter(patient=values["patient"] or None, study=values["study"] or None,
                      user=values["user"] or None, node=values["node"] or None,
                      action=values["action"] or None, since=start, until=end)
    vault = vault_of(request)
    records = select_records(vault, flt)
    if flt.names_patient_data:
        vault.recorder.emit(AuditEvent(
            action="audit.show", outcome=Outcome.SUCCESS, code=EventCode.QUERY,
            actor_user=principal.user, actor_address=client_address(request),
            detail={"matches": len(records), "via": "web"},
            patient_ids=(flt.patient,) if flt.patient else (),
            study_uids=(flt.study,) if flt.study else (),
        ))
    return _audit_page(request, values, records)
