"""WADO-RS request handlers (PS3.18 10.4): instances, metadata, frames, bulk data,
rendered images and thumbnails; the routes that call them are in ``web/dicomweb``.

Split from ``web/dicomweb`` (issue 15): the routes stay there in one list (each checks the
``physician`` role), the protocol choices are in ``wado`` (locating, syntaxes, frames, bulk
data) and ``render``. Each handler answers one request and records it: a success names the
studies (and instances, at instance level) it disclosed, a failure goes through
``dicomweb_common.retrieve_failed`` (one error table, ``web/errors``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pacsvault.audit import EventCode, Outcome
from pacsvault.dicomfile import render
from pacsvault.vault import Vault
from pacsvault.web import dicomweb_common as dw
from pacsvault.web import wado
from pacsvault.web.multipart import closing, new_boundary, parse_accept, part_header
from pacsvault.web.principal import Principal
from pacsvault.web.wado_stream import PartPipeline

log = logging.getLogger("pacsvault.web.dicomweb")

THUMBNAIL_VIEWPORT = (128, 128)


# --- WADO-RS: instances ----------------------------------------------------------------------


async def retrieve(
    request: Request, who: Principal, study: str, series: str | None = None,
    sop: str | None = None,
) -> Response:
    """Instances as multipart/related. Whether each instance can be sent in the syntax
    asked for is settled before the status line (issue 13, defect 6): the cheap check
    (syntax, allowed decoder) for all, the conversion itself for a single instance and for
    the first part; a later part that fails to convert is left out of a still complete
    answer and recorded (``skipped``), never a truncated 200."""
    resource = "instance" if sop else "series" if series else "study"
    vault = dw.vault_of(request)
    boundary = new_boundary()
    skipped: list[wado.Located] = []

    def header(syntax: str, length: int) -> bytes:
        return part_header(boundary, f"application/dicom; transfer-syntax={syntax}", length)

    def part(item: wado.Located, syntax: str) -> bytes:
        """One whole part (headers, object, CRLF): one write per instance."""
        data = wado.instance_bytes(vault, item, syntax)
        return b"".join((header(syntax, len(data)), data, b"\r\n"))

    def stored(item: wado.Located, syntax: str) -> bytes:
        """An object as stored, of the length the answer announced (``exact``)."""
        data = wado.instance_bytes(vault, item, syntax)
        if len(data) != item.size:
            raise RuntimeError("the stored object's length differs from its index row")
        return data

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
        return await dw.retrieve_failed(request, who, resource, exc)
    # Every part as stored (issue 17): the answer's length is known before its first byte
    # (an index row's size is its object's plaintext length, checked again for each part),
    # so it goes out with a Content-Length instead of chunks: no chunk framing, which
    # copied every part once more, and each object written as the bytes decrypted, its
    # part header and the previous part's CRLF in one small write beside it.
    exact = all(s == i.transfer_syntax for i, s in pairs) and len(first) == (
        len(header(pairs[0][1], pairs[0][0].size)) + pairs[0][0].size + 2)
    length = (sum(len(header(s, i.size)) + i.size + 2 for i, s in pairs)
              + len(closing(boundary))) if exact else 0
    await dw.accessed(request, who, resource, items, instance_level=sop is not None)

    async def record_skipped() -> None:
        log.warning("WADO-RS %s: %d instance(s) left out, not convertible", resource,
                    len(skipped))
        await dw.record(request, who, "dicomweb.retrieve", EventCode.INSTANCES_ACCESSED,
                        Outcome.MINOR_FAILURE,
                        message="instances that could not be converted were left out",
                        detail={"resource": resource, "skipped": len(skipped)},
                        study_uids=wado.studies_of(skipped),
                        sop_uids=tuple(i.sop_uid for i in skipped))

    async def body() -> AsyncIterator[bytes]:
        # The next instances are read and decrypted by one thread while this one is sent
        # (``wado_stream``: no hand-off per part, a wake-up only when the loop waits).
        ahead = PartPipeline(stored if exact else part, pairs[after:])
        try:
            yield first
            n = 0
            while (entry := await ahead.next()) is not None:
                item, chunk, error = entry
                if exact and chunk is not None:
                    yield (b"\r\n" if n else b"") + header(item.transfer_syntax, len(chunk))
                    n += 1
                if isinstance(error, wado.WadoError):  # this one cannot be converted
                    skipped.append(item)
                elif error is not None:
                    log.error("an instance could not be read for WADO-RS (%s)",
                              type(error).__name__)
                    await dw.record(request, who, "dicomweb.retrieve",
                                    EventCode.INSTANCES_ACCESSED, Outcome.SERIOUS_FAILURE,
                                    message="an instance could not be read; the answer was cut",
                                    detail={"resource": resource},
                                    study_uids=(item.study_uid,), sop_uids=(item.sop_uid,))
                    raise RuntimeError("instance unreadable") from None
                elif chunk is not None:
                    yield chunk
            yield (b"\r\n" if exact and n else b"") + closing(boundary)
            if skipped:
                await record_skipped()
        finally:  # the client went away: do not leave a read running for nobody
            ahead.close()

    return StreamingResponse(
        body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        headers={"Content-Length": str(length)} if exact else None)


# --- WADO-RS: metadata -----------------------------------------------------------------------


def _instance_url(base: str, item: wado.Located) -> str:
    s = item
    return f"{base}/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"


async def metadata(
    request: Request, who: Principal, study: str, series: str | None = None,
    sop: str | None = None,
) -> Response:
    resource = "metadata"
    try:
        if not dw.accepts_json(request):
            raise wado.WadoError(406, "only application/dicom+json metadata is available")
        items = await run_in_threadpool(wado.locate, dw.vault_of(request), study, series, sop,
                                        with_meta=True)
    except Exception as exc:
        return await dw.retrieve_failed(request, who, resource, exc)
    base = dw.base_url(request)
    vault = dw.vault_of(request)
    try:
        answers = await run_in_threadpool(
            lambda: [wado.metadata(vault, i, _instance_url(base, i)) for i in items])
    except Exception as exc:
        return await dw.retrieve_failed(request, who, resource, exc)
    await dw.accessed(request, who, resource, items, instance_level=sop is not None)
    return dw.json_answer(answers)


# --- WADO-RS: frames and bulk data -----------------------------------------------------------


async def retrieve_frames(
    request: Request, who: Principal, study: str, series: str, sop: str, frames: str
) -> Response:
    vault = dw.vault_of(request)
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
        return await dw.retrieve_failed(request, who, "frames", exc)
    await dw.accessed(request, who, "frames", items, instance_level=True)
    return dw.multipart_answer([(form.content_type, d) for d in data], form.media_type)


async def retrieve_bulkdata(
    request: Request, who: Principal, study: str, series: str, sop: str, path: str
) -> Response:
    vault = dw.vault_of(request)
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
        return await dw.retrieve_failed(request, who, "bulkdata", exc)
    await dw.accessed(request, who, "bulkdata", items, instance_level=True)
    return dw.multipart_answer(parts, part_type)


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


async def rendered(
    request: Request, who: Principal, study: str, series: str | None, sop: str | None,
    frames: str | None, *, thumbnail: bool,
) -> Response:
    resource = "thumbnail" if thumbnail else "rendered"
    vault = dw.vault_of(request)
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
        return await dw.retrieve_failed(request, who, resource, exc)
    await dw.accessed(request, who, resource, items, instance_level=True)
    return Response(data, media_type=options.media_type)
