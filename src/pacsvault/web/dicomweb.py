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
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import traceback
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.crypto.objects import ObjectFormatError
from pacsvault.index.query import QueryBudgetExceeded, QueryError
from pacsvault.vault import Vault
from pacsvault.web import qido, render, stow, wado
from pacsvault.web.deps import require_role
from pacsvault.web.multipart import (
    BodyTooLarge,
    ClientDisconnect,
    MultipartError,
    closing,
    new_boundary,
    parse_accept,
    parse_media_type,
    parse_related,
    part_header,
    read_body,
)
from pacsvault.web.principal import Principal

log = logging.getLogger("pacsvault.web.dicomweb")

router = APIRouter(prefix="/dicom-web")

PHYSICIAN = require_role("physician", allow_token=True)
Who = Annotated[Principal, Depends(PHYSICIAN)]

DICOM_JSON = "application/dicom+json"
THUMBNAIL_VIEWPORT = (128, 128)


# --- helpers ---------------------------------------------------------------------------------


def _vault(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]+)?$")


def _base(request: Request) -> str:
    """Absolute URL of /dicom-web for links in answers.

    The host name comes from the Host header (what the client used to reach us), the port
    from the listening socket: some clients (dicomweb-client) send Host without the port.
    """
    server = request.scope.get("server") or ("localhost", 443)
    host_header = request.headers.get("host", "")
    match = _HOST.match(host_header)
    host = match.group(1) if match else str(server[0])
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = int(server[1]) if server[1] else 443
    authority = host if port == 443 else f"{host}:{port}"
    return f"https://{authority}/dicom-web"


async def _record(
    request: Request, who: Principal, action: str, code: EventCode, outcome: Outcome, *,
    message: str = "", detail: dict[str, str | int | bool] | None = None,
    study_uids: tuple[str, ...] = (), sop_uids: tuple[str, ...] = (),
    patient_ids: tuple[str, ...] = (),
) -> None:
    event = AuditEvent(
        action=action, outcome=outcome, code=code, message=message,
        actor_user=who.user, actor_address=who.address, study_uids=study_uids,
        sop_uids=sop_uids, patient_ids=patient_ids, detail=detail or {},
    )
    await run_in_threadpool(_vault(request).recorder.emit, event)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _accepts_json(request: Request) -> bool:
    return any(r.matches(DICOM_JSON) or r.matches("application/json")
               for r in parse_accept(request.headers.get("accept")))


def _multipart(parts: list[tuple[str, bytes]], part_type: str) -> Response:
    boundary = new_boundary()
    chunks: list[bytes] = []
    for content_type, data in parts:
        chunks += [part_header(boundary, content_type, len(data)), data, b"\r\n"]
    chunks.append(closing(boundary))
    return Response(b"".join(chunks),
                    media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


async def _retrieve_failed(request: Request, who: Principal, resource: str,
                           exc: Exception) -> Response:
    """Answer and record a failed WADO request. Unexpected errors are logged by type only:
    their messages may quote values from a dataset."""
    outcome = Outcome.MINOR_FAILURE
    if isinstance(exc, wado.WadoError):
        status, message = exc.status, str(exc)
    elif isinstance(exc, render.DecodeError):
        status, message = 406, "the pixel data cannot be decoded here"
    elif isinstance(exc, ObjectFormatError):
        status, message = 500, "a stored object failed its integrity check"
        outcome = Outcome.SERIOUS_FAILURE
        log.error("WADO-RS %s: a stored object failed authentication", resource)
    else:
        status, message = 500, "internal error"
        outcome = Outcome.SERIOUS_FAILURE
        log.error("WADO-RS %s failed (%s) at\n%s", resource, type(exc).__name__,
                  "".join(traceback.format_tb(exc.__traceback__)))
    await _record(request, who, "dicomweb.retrieve", EventCode.INSTANCES_ACCESSED, outcome,
                  message=message, detail={"resource": resource, "status": status})
    return _error(status, message)


async def _accessed(
    request: Request, who: Principal, resource: str, items: list[wado.Located], *,
    instance_level: bool,
) -> None:
    await _record(
        request, who, "dicomweb.retrieve", EventCode.INSTANCES_ACCESSED, Outcome.SUCCESS,
        detail={"resource": resource, "instances": len(items)},
        study_uids=wado.studies_of(items),
        sop_uids=tuple(i.sop_uid for i in items) if instance_level else (),
    )


# --- QIDO-RS ---------------------------------------------------------------------------------


async def _search(
    request: Request, who: Principal, level: str, study: str | None = None,
    series: str | None = None,
) -> Response:
    detail: dict[str, str | int | bool] = {"level": qido.describe_level(level)}
    try:
        if not _accepts_json(request):
            raise wado.WadoError(406, "only application/dicom+json answers are available")
        for uid in (study, series):
            if uid is not None:
                wado.check_uid(uid)
        query = qido.parse(request.query_params.multi_items(), level, study=study,
                           series=series)
        result = await run_in_threadpool(qido.search, _vault(request), query, _base(request))
    except Exception as exc:
        outcome, message = Outcome.MINOR_FAILURE, str(exc)
        if isinstance(exc, wado.WadoError):
            status = exc.status
        elif isinstance(exc, QueryBudgetExceeded):
            status = 413  # PS3.18: the query is too broad (documented in ``qido``)
        elif isinstance(exc, (qido.QidoError, QueryError)):
            status = 400
        else:  # by type only: the message may quote a stored value
            status, message, outcome = 500, "internal error", Outcome.SERIOUS_FAILURE
            log.error("QIDO-RS failed (%s) at\n%s", type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)))
        await _record(request, who, "dicomweb.search", EventCode.QUERY, outcome,
                      message=message, detail={**detail, "status": status})
        return _error(status, message)
    accessed = result.accessed
    await _record(
        request, who, "dicomweb.search", EventCode.QUERY, Outcome.SUCCESS,
        detail={**detail, "matches": len(result.answers),
                "references_truncated": accessed.truncated},
        patient_ids=tuple(sorted(accessed.patient_ids)),
        study_uids=tuple(sorted(accessed.study_uids)),
    )
    warnings = list(query.warnings)
    if result.more:
        warnings.append(qido.WARNING_MORE)
    headers = {"Warning": ", ".join(warnings)} if warnings else None
    return _json(result.answers, headers=headers)


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


# --- WADO-RS: instances ----------------------------------------------------------------------


async def _retrieve(
    request: Request, who: Principal, study: str, series: str | None = None,
    sop: str | None = None,
) -> Response:
    """Instances as multipart/related. Whether each instance can be sent in the syntax
    asked for is settled before the status line (issue 13, defect 6): the cheap check
    (syntax, allowed decoder) for all, the conversion itself for a single instance and for
    the first part; a later part that fails to convert is left out of a still complete
    answer and recorded (``skipped``), never a truncated 200."""
    resource = "instance" if sop else "series" if series else "study"
    vault = _vault(request)
    boundary = new_boundary()
    skipped: list[wado.Located] = []

    def part(item: wado.Located, syntax: str) -> bytes:
        """One whole part (headers, object, CRLF): one write per instance."""
        data = wado.instance_bytes(vault, item, syntax)
        return b"".join((
            part_header(boundary, f"application/dicom; transfer-syntax={syntax}", len(data)),
            data, b"\r\n"))

    def first_part(pairs: list[tuple[wado.Located, str]]) -> tuple[int, bytes]:
        """The first part that can be produced, and the index after it."""
        for n, pair in enumerate(pairs):
            try:
                return n + 1, part(*pair)
            except wado.WadoError:  # not convertible (406), or too large to (413)
                if len(pairs) == 1:
                    raise
                skipped.append(pair[0])
        raise wado.ConversionError()

    try:
        items = await run_in_threadpool(wado.locate, vault, study, series, sop)
        ranges = parse_accept(request.headers.get("accept"))
        choices = [wado.choose_syntax(ranges, i.transfer_syntax) for i in items]
        if any(c is None for c in choices):
            raise wado.WadoError(406, "no acceptable transfer syntax for the stored objects")
        pairs = [(i, s) for i, s in zip(items, choices, strict=True) if s is not None]
        after, first = await run_in_threadpool(first_part, pairs)
    except Exception as exc:
        return await _retrieve_failed(request, who, resource, exc)
    await _accessed(request, who, resource, items, instance_level=sop is not None)

    async def record_skipped() -> None:
        log.warning("WADO-RS %s: %d instance(s) left out, not convertible", resource,
                    len(skipped))
        await _record(request, who, "dicomweb.retrieve", EventCode.INSTANCES_ACCESSED,
                      Outcome.MINOR_FAILURE,
                      message="instances that could not be converted were left out",
                      detail={"resource": resource, "skipped": len(skipped)},
                      study_uids=wado.studies_of(skipped),
                      sop_uids=tuple(i.sop_uid for i in skipped))

    async def body() -> AsyncIterator[bytes]:
        # The next instance is read and decrypted in a worker while this one is sent.
        rest = pairs[after:]
        ahead = asyncio.ensure_future(run_in_threadpool(part, *rest[0])) if rest else None
        try:
            yield first
            for n, (item, _syntax) in enumerate(rest):
                assert ahead is not None
                chunk: bytes | None = None
                try:
                    chunk = await ahead
                except wado.WadoError:  # this one cannot be converted: left out
                    skipped.append(item)
                except Exception as exc:
                    log.error("an instance could not be read for WADO-RS (%s)",
                              type(exc).__name__)
                    await _record(request, who, "dicomweb.retrieve",
                                  EventCode.INSTANCES_ACCESSED, Outcome.SERIOUS_FAILURE,
                                  message="an instance could not be read; the answer was cut",
                                  detail={"resource": resource},
                                  study_uids=(item.study_uid,), sop_uids=(item.sop_uid,))
                    raise RuntimeError("instance unreadable") from None
                if n + 1 < len(rest):
                    ahead = asyncio.ensure_future(run_in_threadpool(part, *rest[n + 1]))
                if chunk is not None:
                    yield chunk
            yield closing(boundary)
            if skipped:
                await record_skipped()
        finally:  # the client went away: do not leave a read running for nobody
            if ahead is not None and not ahead.done():
                ahead.cancel()

    return StreamingResponse(
        body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study}")
async def retrieve_study(request: Request, who: Who, study: str) -> Response:
    return await _retrieve(request, who, study)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, who: Who, study: str, series: str) -> Response:
    return await _retrieve(request, who, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}")
async def retrieve_instance(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await _retrieve(request, who, study, series, sop)


# --- WADO-RS: metadata -----------------------------------------------------------------------


def _instance_url(base: str, item: wado.Located) -> str:
    s = item
    return f"{base}/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"


async def _metadata(
    request: Request, who: Principal, study: str, series: str | None = None,
    sop: str | None = None,
) -> Response:
    resource = "metadata"
    try:
        if not _accepts_json(request):
            raise wado.WadoError(406, "only application/dicom+json metadata is available")
        items = await run_in_threadpool(wado.locate, _vault(request), study, series, sop,
                                        with_meta=True)
    except Exception as exc:
        return await _retrieve_failed(request, who, resource, exc)
    base = _base(request)
    vault = _vault(request)
    try:
        answers = await run_in_threadpool(
            lambda: [wado.metadata(vault, i, _instance_url(base, i)) for i in items])
    except Exception as exc:
        return await _retrieve_failed(request, who, resource, exc)
    await _accessed(request, who, resource, items, instance_level=sop is not None)
    return _json(answers)


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, who: Who, study: str) -> Response:
    return await _metadata(request, who, study)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, who: Who, study: str, series: str) -> Response:
    return await _metadata(request, who, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
async def instance_metadata(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await _metadata(request, who, study, series, sop)


# --- WADO-RS: frames and bulk data -----------------------------------------------------------


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
async def retrieve_frames(
    request: Request, who: Who, study: str, series: str, sop: str, frames: str
) -> Response:
    vault = _vault(request)
    try:
        numbers = wado.parse_frames(frames)
        items = await run_in_threadpool(wado.locate, vault, study, series, sop)
        item = items[0]
        form = wado.choose_frame_form(parse_accept(request.headers.get("accept")),
                                      item.transfer_syntax)
        if form is None:
            raise wado.WadoError(406, "no acceptable media type for these frames")
        data = await run_in_threadpool(
            lambda: wado.frames(vault.archive.read(item), numbers, form))
    except Exception as exc:
        return await _retrieve_failed(request, who, "frames", exc)
    await _accessed(request, who, "frames", items, instance_level=True)
    return _multipart([(form.content_type, d) for d in data], form.media_type)


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}")
async def retrieve_bulkdata(
    request: Request, who: Who, study: str, series: str, sop: str, path: str
) -> Response:
    vault = _vault(request)
    ranges = parse_accept(request.headers.get("accept"))
    try:
        items = await run_in_threadpool(wado.locate, vault, study, series, sop)
        item = items[0]
        if wado.is_pixel_path(path):
            form, data = await run_in_threadpool(
                lambda: wado.pixel_bulk(vault.archive.read(item), ranges,
                                        item.transfer_syntax))
            parts = [(form.content_type, d) for d in data]
            part_type = form.media_type
        else:
            if not any(r.matches(wado.OCTET) for r in ranges):
                raise wado.WadoError(406, "bulk data is application/octet-stream")
            value = await run_in_threadpool(
                lambda: wado.bulk_value(vault.archive.read(item), path))
            parts, part_type = [(wado.OCTET, value)], wado.OCTET
    except Exception as exc:
        return await _retrieve_failed(request, who, "bulkdata", exc)
    await _accessed(request, who, "bulkdata", items, instance_level=True)
    return _multipart(parts, part_type)


# --- WADO-RS: rendered and thumbnails --------------------------------------------------------


def _render_options(request: Request, thumbnail: bool) -> render.RenderOptions:
    params = request.query_params
    accept = params.get("accept") or request.headers.get("accept")
    media_type = None
    for r in parse_accept(accept):
        if r.part_type == "image/png":
            media_type = "image/png"
            break
        if r.matches("image/jpeg"):
            media_type = "image/jpeg"
            break
    if media_type is None:
        raise wado.WadoError(406, "rendered images are image/jpeg or image/png")
    try:
        viewport = render.parse_viewport(params.get("viewport"))
        return render.RenderOptions(
            media_type=media_type,
            window=render.parse_window(params.get("window")),
            viewport=viewport or (THUMBNAIL_VIEWPORT if thumbnail else None),
            quality=render.parse_quality(params.get("quality")),
        )
    except render.RenderError as exc:
        raise wado.WadoError(400, str(exc)) from None


def _render_item(vault: Vault, item: wado.Located, frame: int,
                 options: render.RenderOptions) -> bytes:
    ds = wado.read_dataset(vault.archive.read(item))
    if "PixelData" not in ds:
        raise wado.WadoError(404, "the instance has no pixel data")
    count = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    if frame > count:
        raise wado.WadoError(404, "frame not found")
    return render.render(ds, frame - 1, options)


async def _rendered(
    request: Request, who: Principal, study: str, series: str | None, sop: str | None,
    frames: str | None, *, thumbnail: bool,
) -> Response:
    resource = "thumbnail" if thumbnail else "rendered"
    vault = _vault(request)
    try:
        options = _render_options(request, thumbnail)
        frame = 1
        if frames is not None:
            numbers = wado.parse_frames(frames)
            if len(numbers) != 1:
                raise wado.WadoError(400, "render one frame per request")
            frame = numbers[0]
        items = await run_in_threadpool(wado.locate, vault, study, series, sop)
        if sop is None:  # study or series thumbnail: its middle image
            images = [i for i in items if i.frames]
            if not images:
                raise wado.WadoError(404, "nothing to render")
            items = [images[len(images) // 2]]
        data = await run_in_threadpool(_render_item, vault, items[0], frame, options)
    except Exception as exc:
        return await _retrieve_failed(request, who, resource, exc)
    await _accessed(request, who, resource, items, instance_level=True)
    return Response(data, media_type=options.media_type)


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
async def instance_rendered(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await _rendered(request, who, study, series, sop, None, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered")
async def frames_rendered(
    request: Request, who: Who, study: str, series: str, sop: str, frames: str
) -> Response:
    return await _rendered(request, who, study, series, sop, frames, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{sop}/thumbnail")
async def instance_thumbnail(
    request: Request, who: Who, study: str, series: str, sop: str
) -> Response:
    return await _rendered(request, who, study, series, sop, None, thumbnail=True)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail")
async def frames_thumbnail(
    request: Request, who: Who, study: str, series: str, sop: str, frames: str
) -> Response:
    return await _rendered(request, who, study, series, sop, frames, thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail")
async def series_thumbnail(request: Request, who: Who, study: str, series: str) -> Response:
    return await _rendered(request, who, study, series, None, None, thumbnail=True)


@router.get("/studies/{study}/thumbnail")
async def study_thumbnail(request: Request, who: Who, study: str) -> Response:
    return await _rendered(request, who, study, None, None, None, thumbnail=True)


# --- STOW-RS ---------------------------------------------------------------------------------


async def _store(request: Request, who: Principal, study: str | None) -> Response:
    vault = _vault(request)

    async def refused(status: int, message: str) -> Response:
        await _record(request, who, "dicomweb.store", EventCode.IMPORT,
                      Outcome.SERIOUS_FAILURE, message=message, detail={"status": status})
        return _error(status, message)

    if study is not None:
        try:
            wado.check_uid(study)
        except wado.WadoError as exc:
            return await refused(400, str(exc))
    mime, params = parse_media_type(request.headers.get("content-type", ""))
    part_type = params.get("type", "application/dicom").strip().lower()
    if mime != "multipart/related" or part_type != "application/dicom":
        return await refused(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    try:
        body = await read_body(request, stow.MAX_BODY)
        parts = parse_related(body, params.get("boundary", ""))
    except BodyTooLarge:
        return await refused(413, f"request body above {stow.MAX_BODY} bytes; nothing stored "
                                  "(send the instances in several requests)")
    except ClientDisconnect:
        return await refused(400, "the upload was interrupted; nothing stored")
    except MultipartError as exc:
        return await refused(400, f"{exc}; nothing stored")
    if not parts:
        return await refused(400, "no instance in the request")
    if len(parts) > stow.MAX_PARTS:
        return await refused(413, "too many parts in one request; nothing stored")
    base = _base(request)
    outcome = await run_in_threadpool(
        functools.partial(stow.store_parts, user=who.user, address=who.address),
        vault, parts, study, base)
    del body, parts
    for conflict_study, conflict_sop in outcome.conflicts:
        await _record(request, who, "dicomweb.store.conflict", EventCode.SECURITY_ALERT,
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
    await _record(request, who, "dicomweb.store", EventCode.IMPORT, result, detail=detail,
                  study_uids=tuple(sorted(outcome.studies)))
    return _json(stow.response(outcome, study, base), status=status)


@router.post("/studies")
async def store_instances(request: Request, who: Who) -> Response:
    return await _store(request, who, None)


@router.post("/studies/{study}")
async def store_study_instances(request: Request, who: Who, study: str) -> Response:
    return await _store(request, who, study)
