"""A study's actions — patient CD, send to, share — reached from OHIF (issue 20).

OHIF's study list has no extension point for per-study actions short of a custom bundle,
but it offers every loaded *mode* as a button in a study's expanded row. pacsvault adds a
mode of its own there ("Download, send, share…", ``viewer_assets/app-config.js``): its
``onModeInit`` posts the study to ``/account/studies`` instead of opening a viewer. The
viewer's pacsvault menu posts the open study to ``/account/studies/open`` with the action.

Why POST: the Study Instance UID stays out of every URL the server sees (access logs keep
no query string anyway, issue 19, but a POST also keeps it out of the browser's history).
``/account/studies/open`` answers the action's own page (media, send, shares) with the
study filled in; those pages' forms post to their own paths, so nothing else changes.

``GET /account/studies`` lists the user's most recent studies through the same index query
as QIDO-RS, recorded like one (``dicomweb.search``, with the patients and studies listed).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from pacsvault.audit import EventCode, Outcome
from pacsvault.web import dicomweb_common as dw
from pacsvault.web import media_download, qido, send_pages, share_pages
from pacsvault.web.kit import FormValue, PageRole, page, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()
Physician = Annotated[Principal, Depends(PageRole("physician"))]
NO_STORE = {"Cache-Control": "no-store"}
# Enough for "the studies of this morning and the last days" on one page; the index
# answers in its own order, so a larger page is read and the most recent kept.
SHOWN = 50
READ = 500
ACTIONS = ("media", "send", "share")


def _text(answer: dict[str, Any], tag: str) -> str:
    values = (answer.get(tag) or {}).get("Value") or []
    if not values or values[0] is None:
        return ""
    first = values[0]
    if isinstance(first, dict):  # a person name: its alphabetic form
        return str(first.get("Alphabetic", "")).replace("^", " ").strip()
    return "\\".join(str(v) for v in values) if tag == "00080061" else str(first).strip()


def _row(answer: dict[str, Any]) -> dict[str, str]:
    date, time = _text(answer, "00080020"), _text(answer, "00080030")
    shown = f"{date[6:8]}/{date[4:6]}/{date[:4]}" if len(date) == 8 else date
    if len(time) >= 4:
        shown += f" {time[:2]}:{time[2:4]}"
    return {"study": _text(answer, "0020000D"), "patient": _text(answer, "00100010"),
            "patient_id": _text(answer, "00100020"), "when": shown.strip(),
            "sort": date + time, "description": _text(answer, "00081030"),
            "modalities": _text(answer, "00080061")}


async def _recent(request: Request, principal: Principal, study: str = "") -> list[dict[str, str]]:
    """The most recent studies (or the one ``study``), recorded as the query it is."""
    params = [("limit", str(READ)), ("includefield", "00081030")]
    if study:
        params.append(("StudyInstanceUID", study))
    query = qido.parse(params, "STUDY")
    result = await run_in_threadpool(qido.search, vault_of(request), query, "/dicom-web")
    rows = sorted((_row(a) for a in result.answers), key=lambda r: r["sort"], reverse=True)
    shown = [r for r in rows if r["study"]][:SHOWN]
    await dw.record(
        request, principal, "dicomweb.search", EventCode.QUERY, Outcome.SUCCESS,
        detail={"level": qido.describe_level("STUDY"), "matches": len(shown),
                "page": "study actions"},
        patient_ids=tuple(sorted({r["patient_id"] for r in shown if r["patient_id"]})),
        study_uids=tuple(sorted(r["study"] for r in shown)))
    return shown


@router.get("/account/studies")
async def study_list(request: Request, principal: Physician) -> Response:
    """The recent studies, each with its three actions (from the study list's menu)."""
    rows = await _recent(request, principal)
    return page(request, "study_actions.html", headers=NO_STORE, rows=rows, one=False,
                nav="account")


@router.post("/account/studies")
async def one_study(request: Request, principal: Physician, study: FormValue = "") -> Response:
    """One study's actions (the study list's "Download, send, share…" button)."""
    rows = await _recent(request, principal, study.strip()[:128]) if study.strip() else []
    return page(request, "study_actions.html", 200 if rows else 404, headers=NO_STORE,
                rows=rows, one=True, nav="account")


@router.post("/account/studies/open")
def open_action(request: Request, principal: Physician, study: FormValue = "",
                action: FormValue = "") -> Response:
    """The action's page with the study filled in (the forms there post as usual)."""
    study = study.strip()[:128]
    if action == "send":
        return send_pages.send_page(request, principal, study=study)
    if action == "share":
        return share_pages.shares_page(request, principal, study=study)
    return media_download.media_form(request, study)
