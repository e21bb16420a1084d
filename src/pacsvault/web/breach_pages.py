"""The breach register's pages, for administrators and auditors (the DPO): ``/breaches``.

* ``GET /breaches``: every record with its 72-hour clock, and the form opening a new one
  (an actor and a window: the scope is counted from the audit trail, ``breach.scope``);
* ``GET /breaches/show?id=``: one record, its clock, its scope in counts (never a patient's
  name or ID), its dated steps, the update form and the documents;
* ``POST /breaches`` / ``POST /breaches/update``: open / change (CSRF checked by the
  middleware; every change is a new version and a trail event, ``breach.store``);
* ``GET /breaches/document``: the notification draft, the letter or the register, PDF or
  Markdown, French or English; ``POST /breaches/patients``: the list of patients, only
  ever encrypted to the age recipient given in the form.

Ids travel as query or form values, not path segments, so no breach id ends up in a route
template. Physicians are refused: the requirement admits auditors, and administrators from
the practice network only (as every administration page).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from pacsvault.breach import documents, patients
from pacsvault.breach import scope as breach_scope
from pacsvault.breach.labels import label, term
from pacsvault.breach.model import (
    ACTOR_KINDS,
    ART34,
    CIRCUMSTANCES,
    DATA_CATEGORIES,
    DECISIONS,
    DETECTIONS,
    NATURES,
    NO_NOTIFY_GROUNDS,
    NOTIFICATION_KINDS,
    ORIGINS,
    PEOPLE_CATEGORIES,
    SEVERITIES,
    Breach,
    BreachError,
    Notification,
    parse_time,
)
from pacsvault.breach.store import BreachRegister
from pacsvault.web import i18n
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_
from pacsvault.web.kit import PageRole, page, redirect, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()

TEXT = ("title", "controller", "contact", "detection_ref", "circumstances_text", "systems",
        "consequences", "measures_before", "measures_after", "decision_reasons",
        "delay_reasons", "art34_reasons")
CHOICES: dict[str, tuple[str, ...]] = {
    "detection": DETECTIONS, "origin": ORIGINS, "circumstances": CIRCUMSTANCES,
    "severity": SEVERITIES, "decision": DECISIONS, "decision_ground": NO_NOTIFY_GROUNDS,
    "art34": ART34}
TIMES = ("aware_at", "started_at", "ended_at", "patients_informed_at")
LISTS: dict[str, tuple[str, ...]] = {"nature": NATURES, "data_categories": DATA_CATEGORIES,
                                     "people_categories": PEOPLE_CATEGORIES}
FLAGS = ("ongoing", "health_data", "encrypted", "keys_compromised", "people_exact",
         "records_exact")
COUNTS = ("people_count", "records_count")
MAX_TEXT = 4000


class BreachRole(PageRole):
    """Auditors, and administrators (from the trusted networks only, like every
    administration page). ``role`` stays None: the check is the union of two roles."""

    def __init__(self) -> None:
        super().__init__(None)

    async def __call__(self, request: Request) -> Principal:
        principal = await super().__call__(request)
        if principal.has("auditor"):
            return principal
        if principal.has("admin") and vault_of(request).settings.is_trusted(
                client_address(request)):
            return principal
        raise HTTPException(403, N_("Your role does not allow this."))


DpoPage = Annotated[Principal, Depends(BreachRole())]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _lang(request: Request) -> str:
    return i18n.locale_for(request)


def _labels(lang: str) -> dict[str, str]:
    keys = (*TEXT, *CHOICES, *TIMES, *LISTS, *FLAGS, "people_count", "records_count",
            "clock", "scope", "actor", "window", "patients_n", "studies_n", "instances_n",
            "readable_n", "cipher_n", "records_n", "queries_n", "steps", "versions",
            "notifications", "kind", "sent_at", "reference", "when", "what", "by",
            "decided_at", "unintelligible")
    return {k: label(k, lang) for k in keys}


def _vocab(lang: str) -> dict[str, list[tuple[str, str]]]:
    out = {name: [(v, term(v, lang)) for v in values] for name, values in CHOICES.items()}
    out.update({name: [(v, term(v, lang)) for v in values] for name, values in LISTS.items()})
    out["notified"] = [(v, term(v, lang)) for v in NOTIFICATION_KINDS]
    out["actor_kind"] = [(v, term(v, lang)) for v in ACTOR_KINDS]
    return out


def _register(request: Request) -> BreachRegister:
    return BreachRegister(vault_of(request))


def _values(form: Any, *, checkboxes: bool) -> dict[str, Any]:
    """The record's fields from a form; booleans and lists only when ``checkboxes`` (the
    full update form carries them; an unchecked box sends nothing)."""
    values: dict[str, Any] = {}
    for name in TEXT:
        if name in form:
            values[name] = str(form[name])[:MAX_TEXT]
    for name, allowed in CHOICES.items():
        if name in form:
            value = str(form[name])
            if value not in allowed:
                raise BreachError(f"{name}: not one of the choices",
                                  f"{name} : pas l’un des choix")
            values[name] = value
    for name in TIMES:
        text = str(form.get(name, "")).strip()
        if text:
            values[name] = parse_time(text).isoformat(timespec="seconds")
    for name in COUNTS:
        text = str(form.get(name, "")).strip()
        if text:
            if not text.isdigit():
                raise BreachError(f"{name}: a whole number", f"{name} : un nombre entier")
            values[name] = int(text)
    if checkboxes:
        for name in FLAGS:
            values[name] = form.get(name) == "on"
        for name in LISTS:
            values[name] = [str(v) for v in form.getlist(name)]
    return values


def _apply(record: Breach, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(record, name, value)


def _list_page(request: Request, message: str = "", status: int = 200) -> Response:
    lang = _lang(request)
    records = _register(request).all()
    now = _now()
    rows = [{"id": r.id, "version": r.version, "title": r.title, "aware_at": r.aware_at,
             "decision": term(r.decision, lang), "clock": r.clock(now).summary(lang),
             "late": r.clock(now).late} for r in records]
    return page(request, "breaches.html", status, nav="breaches", rows=rows,
                L=_labels(lang), vocab=_vocab(lang), message=message,
                now=now.isoformat(timespec="minutes"))


@router.get("/breaches")
async def breaches_page(request: Request, principal: DpoPage) -> Response:
    return await run_in_threadpool(_list_page, request)


@router.post("/breaches")
async def breach_open(request: Request, principal: DpoPage) -> Response:
    form = await request.form()
    vault = vault_of(request)

    def work() -> Breach:
        now = _now()
        record = Breach(id="", aware_at=now.isoformat(timespec="seconds"))
        _apply(record, _values(form, checkboxes=False))
        kind, value = str(form.get("actor_kind", "")), str(form.get("actor", "")).strip()
        if value:
            since_text = str(form.get("since", "")).strip()
            if not since_text:
                raise BreachError("the window's start is required with an actor",
                                  "le début de la période est requis avec un acteur")
            until_text = str(form.get("until", "")).strip()
            found = breach_scope.compute(
                vault, breach_scope.Actor(kind, value), parse_time(since_text),
                parse_time(until_text) if until_text else now, now)
            record.scope, record.started_at = found, found.since
            record.people_count, record.people_exact = len(found.patients), True
            record.records_count, record.records_exact = found.instances, True
            if found.readable_records:
                record.nature = ["confidentiality"]
        return BreachRegister(vault).open(record, by=principal.user,
                                          address=client_address(request))

    try:
        saved = await run_in_threadpool(work)
    except BreachError as exc:
        return await run_in_threadpool(_list_page, request, exc.say(_lang(request)), 400)
    return redirect(f"/breaches/show?id={saved.id}")


def _show_page(request: Request, breach_id: str, message: str = "",
               status: int = 200) -> Response:
    lang = _lang(request)
    register = _register(request)
    record = register.get(breach_id)
    history = register.history(breach_id)
    now = _now()
    scope = record.scope
    return page(request, "breach.html", status, nav="breaches", r=record,
                clock=record.clock(now).summary(lang), late=record.clock(now).late,
                scope=scope, readable=scope.readable_patients if scope else 0,
                cipher=sum(1 for p in scope.patients if p.ciphertext_only) if scope else 0,
                history=[(v.version, v.updated, v.updated_by, v.steps[-1].what if v.steps
                          else "") for v in history],
                L=_labels(lang), vocab=_vocab(lang), term=lambda v: term(v, lang),
                message=message, kinds=[(k, label(f"{k}_doc", lang)) for k in documents.KINDS])


@router.get("/breaches/show")
async def breach_show(request: Request, principal: DpoPage, id: str = "") -> Response:
    try:
        return await run_in_threadpool(_show_page, request, id)
    except BreachError:
        raise HTTPException(404, N_("No such breach record.")) from None


@router.post("/breaches/update")
async def breach_update(request: Request, principal: DpoPage) -> Response:
    form = await request.form()
    breach_id = str(form.get("id", ""))

    def work() -> Breach:
        values = _values(form, checkboxes=True)

        def change(record: Breach) -> None:
            _apply(record, values)
            kind = str(form.get("notified", ""))
            if kind:
                if kind not in NOTIFICATION_KINDS:
                    raise BreachError("notification kind: initial or complementary",
                                      "type de notification : initiale ou complémentaire")
                sent = str(form.get("notified_at", "")).strip()
                record.notifications.append(Notification(
                    kind, (parse_time(sent) if sent else _now()).isoformat(
                        timespec="seconds"), str(form.get("reference", ""))[:200]))
                if not record.decision:
                    record.decision = "notify"
        return _register(request).update(breach_id, change, by=principal.user,
                                         address=client_address(request))

    try:
        await run_in_threadpool(work)
    except BreachError as exc:
        try:
            return await run_in_threadpool(_show_page, request, breach_id,
                                           exc.say(_lang(request)), 400)
        except BreachError:
            raise HTTPException(404, N_("No such breach record.")) from None
    return redirect(f"/breaches/show?id={breach_id}")


@router.get("/breaches/document")
async def breach_document(request: Request, principal: DpoPage, id: str = "",
                          kind: str = "notification", format: str = "pdf",
                          lang: str = "fr") -> Response:
    if kind not in documents.KINDS or format not in ("pdf", "md") or lang not in ("fr",
                                                                                  "en"):
        raise HTTPException(400, N_("Unknown document."))
    register = _register(request)

    def work() -> bytes:
        now = _now()
        if id:
            record = register.get(id)
            everything = None
        elif kind == "register":
            record, everything = Breach(id="BR-00000000-000000"), register.all()
        else:
            raise BreachError("which breach?")
        doc = documents.build(kind, record, lang, now, everything)
        data = doc.to_pdf() if format == "pdf" else doc.to_markdown().encode()
        if id:
            register.note_step(id, f"exported {kind}", by=principal.user,
                               action="breach.exported")
        return data

    try:
        data = await run_in_threadpool(work)
    except BreachError:
        raise HTTPException(404, N_("No such breach record.")) from None
    name = f"{id or 'register'}-{kind}-{lang}.{format}"
    media = "application/pdf" if format == "pdf" else "text/markdown; charset=utf-8"
    return Response(data, media_type=media, headers={
        "content-disposition": f'attachment; filename="{name}"', "cache-control": "no-store"})


@router.post("/breaches/patients")
async def breach_patients(request: Request, principal: DpoPage) -> Response:
    form = await request.form()
    breach_id, recipient = str(form.get("id", "")), str(form.get("recipient", "")).strip()
    register = _register(request)

    def work() -> bytes:
        record = register.get(breach_id)
        data = patients.export(vault_of(request), record, recipient=recipient,
                               by=principal.user, address=client_address(request))
        register.note_step(breach_id, "exported patients (encrypted)", by=principal.user,
                           action="breach.exported")
        return data

    try:
        data = await run_in_threadpool(work)
    except BreachError as exc:
        try:
            return await run_in_threadpool(_show_page, request, breach_id,
                                           exc.say(_lang(request)), 400)
        except BreachError:
            raise HTTPException(404, N_("No such breach record.")) from None
    return Response(data, media_type="application/octet-stream", headers={
        "content-disposition": f'attachment; filename="{breach_id}-patients.csv.age"',
        "cache-control": "no-store"})
