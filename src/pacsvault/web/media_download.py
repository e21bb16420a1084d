"""The physician's patient CD / USB download (issue 20, part 4): a ZIP of the DICOM media.

``/account/media`` asks for a Study Instance UID or a Patient ID (the viewer's study list
shows both); its form posts to ``/account/media/download``, which answers the file-set of
``media.export`` (DICOMDIR, ``PT000000/...`` instances as stored, INDEX.HTM, README.TXT)
as a ZIP streamed from memory: one instance decrypted at a time, chunks out as they are
ready, never a plaintext file on the server. The length is known before the first byte
(``zipped.length``; up to 2 GiB): the browser shows the download's progress.

The disclosure is recorded before the response starts (``MediaExport``): if the trail
cannot take it, the answer is 503 and nothing leaves. The POST carries the session's CSRF
token like every form (checked by the session middleware). The ZIP's name carries no
patient data; the response is not cached.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response, StreamingResponse

from pacsvault.media import export as media
from pacsvault.media import zipped
from pacsvault.web import i18n
from pacsvault.web.deps import client_address
from pacsvault.web.kit import FormValue, PageRole, gettext, page, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()
Physician = Annotated[Principal, Depends(PageRole("physician"))]
ZIP_NAME = "dicom-media.zip"
FOLDER = "DICOM-MEDIA"  # the ZIP's top folder: unzip, then copy its content to the key


def _page(request: Request, status: int = 200, message: str = "", study: str = "") -> Response:
    return page(request, "media.html", status, message=message, message_kind="error",
                nav="account", study=study, headers={"Cache-Control": "no-store"})


@router.get("/account/media")
def media_page(request: Request, principal: Physician,
               study: Annotated[str, Query(max_length=128)] = "") -> Response:
    """The form; ``?study=UID`` fills it in (a link from the viewer's study)."""
    return _page(request, study=study.strip())


def media_form(request: Request, study: str) -> Response:
    """The form with ``study`` filled in (``study_actions``: the study came in a POST)."""
    return _page(request, study=study.strip())


@router.post("/account/media/download")
def media_download(request: Request, principal: Physician, study: FormValue = "",
                   patient: FormValue = "") -> Response:
    """The study (or every study of the patient) as a ZIP of a DICOM media."""
    _ = gettext(request)
    study, patient = study.strip(), patient.strip()
    vault = vault_of(request)
    items = media.select_items(vault, study_uid=study or None, patient_id=patient or None)
    if not items:
        return _page(request, 400, _("No study with this UID, or no patient with this ID."))
    try:
        job = media.MediaExport(vault, items, media.Request(
            actor_user=principal.user, actor_address=client_address(request),
            destination="web download", lang=i18n.locale_for(request)))
    except media.MediaError:
        return _page(request, 400, _("No study with this UID, or no patient with this ID."))
    headers = {"Cache-Control": "no-store",
               "Content-Disposition": f'attachment; filename="{ZIP_NAME}"'}
    size = zipped.length(job.sizes(), FOLDER)
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(zipped.stream(job, FOLDER), media_type="application/zip",
                             headers=headers)
