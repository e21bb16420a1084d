"""DICOMweb (PS3.18) under /dicom-web: QIDO-RS, WADO-RS, STOW-RS.

Every route requires the ``physician`` role, through a browser session or an API token.
Every request is recorded through the vault's single event path with the user, the source
address and the studies it touched (sealed in the trail, never in plain logs):

============================  ===================  =========================================
request                       action               code / references
============================  ===================  =========================================
QIDO search                   dicomweb.search      QUERY; patients and studies disclosed
WADO instances, metadata,     dicomweb.retrieve    INSTANCES_ACCESSED; studies (and the
frames, bulk data, rendered,                       instance for instance-level resources)
thumbnails
STOW                          dicomweb.store       IMPORT; studies stored
STOW conflicting object       dicomweb.store.      SECURITY_ALERT; study and instance
                              conflict
============================  ===================  =========================================

Messages and details carry levels, counts and reasons, never a query value or a patient
attribute. Query strings are never logged (the access log is off). The protocol details
and negotiation choices are documented in ``qido``, ``wado``, ``stow`` and ``render``.

This module is the route list (all 22, each behind the role check), QIDO-RS and STOW-RS;
the WADO-RS handlers are in ``wado_handlers``, what the routes share (base URL, records,
answers) in ``dicomweb_common``, the one error type and its table in ``errors``.
"""

from __future__ import annotations

import functools
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from pacsvault.audit import AuditEvent, AuditUnavailable, EventCode, Outcome
from pacsvault.index.rawselect import read_would_wait
from pacsvault.vault import Vault
from pacsvault.web import dicomweb_common as dw
from pacsvault.web import errors, qido, stow, wado, wado_handlers
from pacsvault.web.deps import require_role
from pacsvault.web.principal import Principal

log = logging.getLogger("pacsvault.web.dicomweb")

router = APIRouter(prefix="/dicom-web")

# Reads also admit a share session (issue 19), scoped to its one study: ``deps._scoped``
# for a study in the path, ``_search`` for the searches without one. Storing never.
PHYSICIAN = require_role("physician", allow_token=True, allow_share=True)
Who = Annotated[Principal, Depends(PHYSICIAN)]
STORER = require_role("physician", allow_token=True)
Storer = Annotated[Principal, Depends(STORER)]

DICOM_JSON = dw.DICOM_JSON


# --- QIDO-RS ---------------------------------------------------------------------------------


async def _search(
    request: Request, who: Principal, level: str, study: str | None = None,
    series: str | None = None,
) -> Response:
    detail: dict[str, str | int | bool] = {"level": qido.describe_level(level)}
    try:
        if not dw.accepts_json(request):
            raise wado.WadoError(406, "only application/dicom+json answers are available")
        for uid in (study, series):
            if uid is not None:
                wado.check_uid(uid)
        if who.share:  # a share session searches its one study, whatever the query
            study = who.study
        query = qido.parse(request.query_params.multi_items(), level, study=study,
                           series=series)
        vault, base = dw.vault_of(request), dw.base_url(request)
        if _inline(vault):
            # On the event loop (``_inline``); its record durable before the answer leaves
            # as below, or, when the trail or the index's write lock is taken, in a worker.
            result = qido.search(vault, query, base)
            event = _search_event(result, who, detail)
            if not vault.recorder.try_emit(event):
                await run_in_threadpool(vault.recorder.emit, event)
        else:
            # One hop to a worker thread for the search and its record (durable before the
            # answer leaves: ``emit`` returns once it is, else raises ``AuditUnavailable``).
            result = await run_in_threadpool(_search_recorded, vault, query, base, who,
                                             detail)
    except AuditUnavailable:
        raise  # the app's handler answers 503: nothing was disclosed
    except Exception as exc:
        failed = errors.failure(exc, log, "QIDO-RS", dw.RULES)
        outcome = Outcome.SERIOUS_FAILURE if failed.serious else Outcome.MINOR_FAILURE
        await dw.record(request, who, "dicomweb.search", EventCode.QUERY, outcome,
                        message=failed.message, detail={**detail, "status": failed.status})
        return failed.response()
    warnings = list(query.warnings)
    if result.more:
        warnings.append(qido.WARNING_MORE)
    headers = {"Warning": ", ".join(warnings)} if warnings else None
    return dw.json_answer(result.answers, headers=headers)


def _inline(vault: Vault) -> bool:
    """Whether a search runs on the event loop rather than in a worker thread: on an
    embedded index whose read would not wait (``rawselect.read_would_wait``: no re-key
    underway, an idle pooled connection). Why: the two thread switches of the hand-off
    cost ~0.5 ms of CPU per QIDO-RS request here, about what the search itself costs
    (issue 17); a search is a few indexed reads and at most ``qido.MAX_RESULTS`` answers
    (a 10,000-study index: ~10 ms), and while a worker thread searches it holds the GIL
    that the loop waits for anyway. Its record is tried without waiting
    (``Recorder.try_emit``); a PostgreSQL index (round trips) always hands off."""
    engine = getattr(vault, "engine", None)
    return (isinstance(engine, Engine) and engine.dialect.name == "sqlite"
            and not read_would_wait(engine))


def _search_event(result: qido.QidoResult, who: Principal,
                  detail: dict[str, str | int | bool]) -> AuditEvent:
    """The record of what the answers disclose."""
    accessed = result.accessed
    return dw.event_of(
        who, "dicomweb.search", EventCode.QUERY, Outcome.SUCCESS,
        detail={**detail, "matches": len(result.answers),
                "references_truncated": accessed.truncated},
        patient_ids=tuple(sorted(accessed.patient_ids)),
        study_uids=tuple(sorted(accessed.study_uids)),
        study_patients={s: p for s, p in accessed.study_patients.items()
                        if s in accessed.study_uids},
    )


def _search_recorded(vault: Vault, query: qido.QidoQuery, base: str, who: Principal,
                     detail: dict[str, str | int | bool]) -> qido.QidoResult:
    """Search, then record what the answers disclose (in the same worker thread)."""
    result = qido.search(vault, query, base)
    vault.recorder.emit(_search_event(result, who, detail))
    return result


@router.get("/studies")
async def search_studies(request: Request, who: Who) -> Response:
    return await _search(request, who, "STUDY")


@router.get("/series")
async def search_series(request: Request, who: Who) -> Response:
    return await _search(request, who, "SERIES")


@router.get("/instances")
async def search_instances(request: Request, who: Who) -> Response:
    return await _search(request, who, "IMAGE")


@router.get("/studies/{study}/series")
async def search_study_series(request: Request, who: Who, study: str) -> Response:
    return await _search(request, who, "SERIES", study)


@router.get("/studies/{study}/instances")
async def search_study_instances(request: Request, who: Who, study: str) -> Response:
    return await _search(request, who, "IMAGE", study)


@router.get("/studies/{study}/series/{series}/instances")
async def search_series_instances(
    request: Request, who: Who, study: str, series: str
) -> Response:
    return await _search(request, who, "IMAGE", study, series)


# --- WADO-RS: instances --------------------------------------------------------------------


@router.get("/studies/{study}")
async def retrieve_study(request: Request, who: Who, study: str) -> Response:
    return await wado_handlers.retrieve(request, who, study)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, who: Who, study: str, series: str) -> Response:
    return await wado_handlers.retrieve(request, who, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await wado_handlers.retrieve(request, who, study, series, sop)


# --- WADO-RS: metadata ---------------------------------------------------------------------


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, who: Who, study: str) -> Response:
    return await wado_handlers.metadata(request, who, study)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, who: Who, study: str, series: str) -> Response:
    return await wado_handlers.metadata(request, who, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
async def instance_metadata(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await wado_handlers.metadata(request, who, study, series, sop)


# --- WADO-RS: frames and bulk data ---------------------------------------------------------


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
async def retrieve_frames(
    request: Request, who: Who, study: str, series: str, sop: str, frames: str
) -> Response:
    return await wado_handlers.retrieve_frames(request, who, study, series, sop, frames)


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}")
async def retrieve_bulkdata(
    request: Request, who: Who, study: str, series: str, sop: str, path: str
) -> Response:
    return await wado_handlers.retrieve_bulkdata(request, who, study, series, sop, path)


# --- WADO-RS: rendered and thumbnails ------------------------------------------------------


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
async def instance_rendered(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await wado_handlers.rendered(request, who, study, series, sop, None, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered")
async def frames_rendered(
    request: Request, who: Who, study: str, series: str, sop: str, frames: str
) -> Response:
    return await wado_handlers.rendered(request, who, study, series, sop, frames, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def instance_thumbnail(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await wado_handlers.rendered(request, who, study, series, sop, None, thumbnail=True)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail")
async def frames_thumbnail(
    request: Request, who: Who, study: str, series: str, sop: str, frames: str
) -> Response:
    return await wado_handlers.rendered(request, who, study, series, sop, frames, thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail")
async def series_thumbnail(request: Request, who: Who, study: str, series: str) -> Response:
    return await wado_handlers.rendered(request, who, study, series, None, None, thumbnail=True)


@router.get("/studies/{study}/thumbnail")
async def study_thumbnail(request: Request, who: Who, study: str) -> Response:
    return await wado_handlers.rendered(request, who, study, None, None, None, thumbnail=True)


# --- STOW-RS ---------------------------------------------------------------------------------


async def _store(request: Request, who: Principal, study: str | None) -> Response:
    vault = dw.vault_of(request)
    try:
        parts, body = await stow.read_request(request, study)
    except errors.DicomWebError as exc:
        await dw.record(request, who, "dicomweb.store", EventCode.IMPORT,
                        Outcome.SERIOUS_FAILURE, message=exc.message,
                        detail={"status": exc.status})
        return errors.response(exc.status, exc.message)
    base = dw.base_url(request)
    outcome = await run_in_threadpool(
        functools.partial(stow.store_parts, user=who.user, address=who.address),
        vault, parts, study, base)
    del body, parts
    for conflict_study, conflict_sop in outcome.conflicts:
        await dw.record(request, who, "dicomweb.store.conflict", EventCode.SECURITY_ALERT,
                        Outcome.MINOR_FAILURE,
                        message="a different object was sent under an existing SOP Instance "
                                "UID; the first one was kept",
                        study_uids=(conflict_study,), sop_uids=(conflict_sop,))
    status = outcome.status
    result = (Outcome.SUCCESS if status == 200 else
              Outcome.MINOR_FAILURE if status == 202 else Outcome.SERIOUS_FAILURE)
    detail: dict[str, str | int | bool] = {**outcome.counts}
    if outcome.reasons:
        detail["reasons"] = ",".join(f"{k}x{v}" for k, v in sorted(outcome.reasons.items()))
    await dw.record(request, who, "dicomweb.store", EventCode.IMPORT, result, detail=detail,
                    study_uids=tuple(sorted(outcome.studies)))
    return dw.json_answer(stow.response(outcome, study, base), status=status)


@router.post("/studies")
async def store_instances(request: Request, who: Storer) -> Response:
    return await _store(request, who, None)


@router.post("/studies/{study}")
async def store_study_instances(request: Request, who: Storer, study: str) -> Response:
    return await _store(request, who, study)
