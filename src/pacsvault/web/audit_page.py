"""The auditor's page: ``/audit``, the web face of ``pacsvault audit show`` for a DPO.

One row per access, not per request: the many DICOMweb records of one viewing become one
"viewed a study, N images" row (``audit.grouping``), with the records behind it in the
row's details. Rows name the patient and the study (resolved through the index for the
rows shown: ``audit_rows``), times are in the practice's time zone, actions have names in
the reader's language (``audit_names``). Fifty rows a page, newest first.

Filters (patient, study, user, DICOM device, period, action) are sent with POST and the
session's CSRF token, pagination included, so that a Patient ID never ends up in a URL,
a browser history or a proxy log. Both use ``audit.query.select_records``, the CLI's own
filtering. A patient can be given by name instead of ID (a DPO is asked by a person):
the index's own name matching finds them, and the choice is offered when several match.
The filtered view exports as CSV (streamed) or PDF, and a patient's access report (GDPR
art. 15) is one click from the patient filter or from any row naming a patient
(``audit_export``).

Reading the accesses to a patient or a study is recorded (``audit.show``), as on the
command line; every export is (``audit.export``, ``audit.patient_report``): the readable
part of these records names the format, the counts and which filters were used, never a
value; the patient, when there is one, is in the sealed references like any access.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from starlette.responses import Response, StreamingResponse

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.grouping import VIEW, Group, group_records
from pacsvault.audit.query import AuditFilter, select_records
from pacsvault.index.query import QueryError
from pacsvault.vault import Vault
from pacsvault.web import audit_export, audit_names
from pacsvault.web.audit_rows import (
    LOOKUP_LIMIT,
    Directory,
    build_rows,
    patients_named,
    person_name,
    practice_zone,
    zone_label,
)
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import Gettext, gettext, locale_for
from pacsvault.web.kit import PageRole, page, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()

AuditorPage = Annotated[Principal, Depends(PageRole("auditor"))]
FormField = Annotated[str, Form(max_length=256)]
PER_PAGE = 50
FIELDS = ("patient", "study", "user", "node", "action", "since", "until")
FORMATS = {"csv", "pdf"}


@dataclasses.dataclass(frozen=True)
class Query:
    """The form's values (as typed, for the page) and what they select."""

    values: dict[str, str]
    flt: AuditFilter
    views_only: bool

    @property
    def used(self) -> str:
        """Which filters were used, by name (what an export's record may say)."""
        return ",".join(k for k in FIELDS if self.values.get(k))


def _when(text: str, zone: dt.tzinfo, end: bool) -> dt.datetime | None:
    """A date (the whole day: from its start, or to its end) or a date and time, in the
    practice's zone unless it names its own."""
    if not text:
        return None
    if len(text) == 10:
        day = dt.date.fromisoformat(text)  # ValueError: not a date
        return dt.datetime.combine(day, dt.time.max if end else dt.time.min, zone)
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=zone)


def _zone(vault: Vault) -> dt.tzinfo:
    """The practice's zone of every page (``[web] time_zone``), so the audit page, the
    Health page and the account pages agree on what time an access happened."""
    return practice_zone(vault.settings.web.time_zone)


def _query(values: dict[str, str], zone: dt.tzinfo) -> Query:
    """The filter the form means; ValueError for a period that is not a date."""
    action = values["action"]
    views = action == VIEW
    flt = AuditFilter(patient=values["patient"] or None, study=values["study"] or None,
                      user=values["user"] or None, node=values["node"] or None,
                      action="dicomweb." if views else (action or None),
                      since=_when(values["since"], zone, end=False),
                      until=_when(values["until"], zone, end=True))
    return Query(values, flt, views)


def _groups(vault: Vault, query: Query) -> tuple[list[Group], int]:
    """The rows' groups, newest first, and how many records they hold."""
    records = select_records(vault, query.flt)
    groups = group_records(records)
    if query.views_only:
        groups = [g for g in groups if g.kind == VIEW]
    groups.reverse()
    return groups, sum(len(g.records) for g in groups)


def _values(**fields: str) -> dict[str, str]:
    return {k: fields.get(k, "").strip() for k in FIELDS}


def _audit_page(request: Request, values: dict[str, str], groups: list[Group],
                records: int, number: int = 1, status: int = 200,
                message: str = "", field: str = "since",
                candidates: list[tuple[str, str]] | None = None) -> Response:
    vault = vault_of(request)
    zone = _zone(vault)
    _ = gettext(request)
    pages = max(1, -(-len(groups) // PER_PAGE))
    number = min(max(1, number), pages)
    shown = groups[(number - 1) * PER_PAGE:number * PER_PAGE]
    rows = build_rows(vault, shown, zone, locale_for(request), _)
    choices = [(value, _(name)) for value, name in audit_names.FILTERS]
    return page(request, "audit.html", status, values=values, rows=rows,
                total=len(groups), records=records, number=number, pages=pages,
                zone=zone_label(zone), choices=choices, message=message, nav="audit",
                candidates=(candidates or [])[:LOOKUP_LIMIT],
                more_candidates=len(candidates or []) > LOOKUP_LIMIT,
                field_errors={field: message} if message else {})


def _bad_period(request: Request, values: dict[str, str]) -> Response:
    _ = gettext(request)
    return _audit_page(request, values, [], 0, status=400, message=_(
        "Dates must be dates, such as 2024-01-31, or a date and a time, such as "
        "2024-01-31T08:00."))


def _record(request: Request, principal: Principal, action: str, code: EventCode,
            query: Query, detail: dict[str, str | int | bool]) -> None:
    flt = query.flt
    vault_of(request).recorder.emit(AuditEvent(
        action=action, outcome=Outcome.SUCCESS, code=code, actor_user=principal.user,
        actor_address=client_address(request), detail={**detail, "via": "web"},
        patient_ids=(flt.patient,) if flt.patient else (),
        study_uids=(flt.study,) if flt.study else (),
    ))


@router.get("/audit")
def audit_page(request: Request, principal: AuditorPage) -> Response:
    groups, records = _groups(vault_of(request), _query(_values(), dt.UTC))
    return _audit_page(request, _values(), groups, records)


def _lookup(request: Request, principal: Principal, values: dict[str, str]) -> Response | None:
    """The patient named in the form: found alone, their ID becomes the filter (None:
    go on); else the page with the candidates, or with "no patient has this name". The
    look-up lists names: it is recorded (``audit.show``, the candidates sealed)."""
    vault = vault_of(request)
    _ = gettext(request)
    try:
        found = patients_named(vault, values["patient_name"], vault.settings.server.ae_title,
                               vault.settings.query.time_budget_seconds)
    except QueryError:  # over the query time budget: nothing was listed
        return _audit_page(request, values, [], 0, status=400, field="patient_name",
                           message=_("The search by name took too long: type more of it."))
    vault.recorder.emit(AuditEvent(
        action="audit.show", outcome=Outcome.SUCCESS, code=EventCode.QUERY,
        actor_user=principal.user, actor_address=client_address(request),
        detail={"lookup": "name", "matches": len(found), "via": "web"},
        patient_ids=tuple(pid for pid, _name in found)))
    if len(found) == 1:
        values["patient"] = found[0][0]
        return None
    if not found:
        return _audit_page(request, values, [], 0, status=404, field="patient_name",
                           message=_("No patient has this name."))
    return _audit_page(request, values, [], 0, candidates=found)


@router.post("/audit")
def audit_search(request: Request, principal: AuditorPage, patient: FormField = "",
                 study: FormField = "", user: FormField = "", node: FormField = "",
                 action: FormField = "", since: FormField = "", until: FormField = "",
                 patient_name: FormField = "",
                 page_number: Annotated[int, Form(alias="page", ge=1, le=1_000_000)] = 1,
                 ) -> Response:
    values = _values(patient=patient, study=study, user=user, node=node, action=action,
                     since=since, until=until)
    values["patient_name"] = patient_name.strip()
    if values["patient_name"] and not values["patient"]:
        answer = _lookup(request, principal, values)
        if answer is not None:
            return answer
    vault = vault_of(request)
    try:
        query = _query(values, _zone(vault))
    except ValueError:
        return _bad_period(request, values)
    groups, records = _groups(vault, query)
    if query.flt.names_patient_data:
        _record(request, principal, "audit.show", EventCode.QUERY, query,
                {"matches": records, "rows": len(groups), "page": page_number})
    return _audit_page(request, values, groups, records, page_number)


def _attachment(name: str) -> dict[str, str]:
    return {"content-disposition": f'attachment; filename="{name}"',
            "cache-control": "no-store"}


def _stamp(zone: dt.tzinfo) -> str:
    return dt.datetime.now(zone).strftime("%Y%m%d-%H%M")


def _filter_fields(values: dict[str, str], _: Gettext) -> list[tuple[str, str]]:
    action = values["action"]
    return [(_("Patient ID"), values["patient"]), (_("Study Instance UID"), values["study"]),
            (_("User name"), values["user"]), (_("DICOM device (AE title)"), values["node"]),
            (_("Action"), audit_names.action_name(action, _) if action else ""),
            (_("From"), values["since"]), (_("To"), values["until"])]


@router.post("/audit/export")
def audit_export_view(request: Request, principal: AuditorPage, patient: FormField = "",
                      study: FormField = "", user: FormField = "", node: FormField = "",
                      action: FormField = "", since: FormField = "",
                      until: FormField = "", patient_name: FormField = "",
                      format: Annotated[str, Form(max_length=8)] = "csv") -> Response:
    """The filtered view, every page of it, as CSV (streamed) or PDF; recorded first."""
    values = _values(patient=patient, study=study, user=user, node=node, action=action,
                     since=since, until=until)
    values["patient_name"] = patient_name.strip()
    if values["patient_name"] and not values["patient"]:
        answer = _lookup(request, principal, values)
        if answer is not None:
            return answer
    vault = vault_of(request)
    zone = _zone(vault)
    try:
        query = _query(values, zone)
    except ValueError:
        return _bad_period(request, values)
    fmt = format if format in FORMATS else "csv"
    groups, records = _groups(vault, query)
    _record(request, principal, "audit.export", EventCode.EXPORT, query,
            {"format": fmt, "rows": len(groups), "records": records,
             "filters": query.used or "none"})
    _ = gettext(request)
    lang = locale_for(request)
    name = f"audit-{_stamp(zone)}.{fmt}"
    if fmt == "pdf":
        doc = audit_export.listing(vault, groups, _filter_fields(values, _), zone, lang, _,
                                   principal.user)
        return Response(doc.to_pdf(), media_type="application/pdf",
                        headers=_attachment(name))
    return StreamingResponse(audit_export.csv_lines(vault, groups, zone, lang, _),
                             media_type="text/csv; charset=utf-8",
                             headers=_attachment(name))


@router.post("/audit/patient-report")
def patient_access_report(request: Request, principal: AuditorPage,
                          patient: FormField = "", patient_name: FormField = "") -> Response:
    """A patient's access report (GDPR art. 15) as PDF: every access to their file, all
    time, their own references only; recorded before it is made."""
    vault = vault_of(request)
    values = _values(patient=patient)
    values["patient_name"] = patient_name.strip()
    if values["patient_name"] and not values["patient"]:
        answer = _lookup(request, principal, values)
        if answer is not None:
            return answer
    if not values["patient"]:
        _ = gettext(request)
        groups, records = _groups(vault, _query(_values(), dt.UTC))
        return _audit_page(request, values, groups, records, status=400, message=_(
            "Enter the patient ID of the report."), field="patient")
    query = _query(values, dt.UTC)
    groups, records = _groups(vault, query)
    _record(request, principal, "audit.patient_report", EventCode.EXPORT, query,
            {"format": "pdf", "rows": len(groups), "records": records})
    pid = values["patient"]
    name = person_name(Directory.load(vault, (), (pid,)).names.get(pid, ""))
    zone = _zone(vault)
    doc = audit_export.patient_report(vault, pid, name, groups, zone, locale_for(request),
                                      gettext(request), principal.user)
    return Response(doc.to_pdf(), media_type="application/pdf",
                    headers=_attachment(f"patient-access-report-{_stamp(zone)}.pdf"))
