"""Share links on the web (issue 19, part 2), and the physician's de-identified download.

Two sides:

* the physician (role ``physician``, signed in): ``/account/shares`` lists their links and
  makes one (study, days, download or not, identified or de-identified); the link and the
  one-time code are shown once; ``/account/shares/revoke`` ends one;
  ``/account/deidentified`` downloads a study de-identified (``deidentify.export``) as a
  ZIP built in memory (no identified byte on disk);
* the outside colleague, who has no account: ``/share/{link}`` asks for the code, then a
  share session cookie (``__Host-pvshare``, ``share_scope``) opens ``/share/{link}/study``:
  OHIF on that one study (``/viewer``, whose configuration names the study: ``viewer``),
  or, where the viewer is not installed, the series and their rendered images
  (``/share/{link}/image/{n}``); if granted, ``/share/{link}/download``;
  ``/share/{link}/signout`` ends it. A session that ended under the colleague (the link
  expired or was revoked while the viewer was open) sends every reload of the viewer or of
  these pages to ``/share/{link}/ended``, which says so (not to the staff sign-in page,
  which means nothing to them). That cookie is read by these routes, OHIF's and the
  DICOMweb reads only (``share_scope``): every other route of the application sees a
  browser without credentials (tests/test_share_links.py sweeps them all). The URL carries
  the opaque link id only, never a UID: images are numbered.

Every opening is recorded (``ShareLinks.opened``), before the answer leaves.
"""

from __future__ import annotations

import io
import zipfile
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from pacsvault.deidentify import export as deid
from pacsvault.deidentify.options import PROFILES
from pacsvault.dicomfile import render
from pacsvault.index.records import StoredInstance
from pacsvault.sharing.links import DEFAULT_DAYS, MAX_DAYS, Share, ShareError
from pacsvault.vault import Vault
from pacsvault.web import viewer, wado
from pacsvault.web.deps import client_address
from pacsvault.web.i18n import N_
from pacsvault.web.kit import FormValue, PageRole, gettext, page, redirect, vault_of
from pacsvault.web.principal import Principal
from pacsvault.web.share_scope import (
    COOKIE,
    MAX_LINK,
    cookie_parts,
    cookie_value,
    ended_share,
    session_share,
    shares_of,
)

router = APIRouter()
Physician = Annotated[Principal, Depends(PageRole("physician"))]
NOT_VALID = N_("This share link is not valid: it expired, was revoked, or does not exist. "
               "Ask the physician who shared it for a new one.")
NO_STORE = {"Cache-Control": "no-store"}
# The profiles as the pages describe them (deidentify.options.PROFILES, translated).
PROFILE_SUMMARIES = {
    "basic": N_("Annex E basic profile only: every date, description and device identifier "
                "removed"),
    "research": N_("basic + dates shifted per patient, sex/age/size/weight, device identity "
                   "and cleaned descriptions kept"),
    "teaching": N_("basic + sex/age/size/weight and cleaned descriptions kept; no dates"),
}


def _items(vault: Vault, study: str) -> list[StoredInstance]:
    return list(vault.archive.locate(study_uid=study))


# --- the physician's side --------------------------------------------------------------


def shares_page(request: Request, principal: Principal, status: int = 200, *,
                message: str = "", created: dict[str, str] | None = None,
                study: str = "") -> Response:
    mine = shares_of(request).mine(principal.user)
    now = shares_of(request).clock()
    headers = NO_STORE if created else None
    return page(request, "shares.html", status, headers=headers, shares=mine, now=now,
                profiles=PROFILE_SUMMARIES, max_days=MAX_DAYS, default_days=DEFAULT_DAYS,
                message=message, created=created, study=study, nav="account")


@router.get("/account/shares")
def list_shares(request: Request, principal: Physician, study: str = "") -> Response:
    """The page; ``?study=UID`` fills in the study of both forms."""
    return shares_page(request, principal, study=study.strip()[:128])


@router.post("/account/shares")
def create_share(request: Request, principal: Physician, study: FormValue = "",
                 days: Annotated[int, Form(ge=1, le=MAX_DAYS)] = DEFAULT_DAYS,
                 download: FormValue = "", profile: FormValue = "", project: FormValue = "",
                 accept_burned_in: FormValue = "") -> Response:
    _ = gettext(request)
    vault = vault_of(request)
    items = _items(vault, study.strip()) if study.strip() else []
    if not items:
        return shares_page(request, principal, 400, message=_("No study with this UID."))
    if profile and profile not in PROFILES:
        return shares_page(request, principal, 400, message=_("Unknown profile."))
    if profile and not accept_burned_in and deid.flagged(vault, items):
        return shares_page(request, principal, 400, message=_(
            "Some images of this study may show the patient's name in their pixels "
            "(ultrasound, screenshots, burned-in text); they are not cleaned. Tick the "
            "confirmation to share them anyway."))
    try:
        made = shares_of(request).create(
            principal.user, study.strip(), days=days, download=bool(download),
            deidentify=profile, project=project.strip() if profile else "",
            address=client_address(request))
    except ShareError:
        return shares_page(request, principal, 400, message=_(
            "A de-identified share needs a project name."))
    url = f"{request.base_url}share/{made.link_id}"
    return shares_page(request, principal, created={"url": url, "code": made.code})


@router.post("/account/shares/revoke")
def revoke_share(request: Request, principal: Physician,
                 share: Annotated[int, Form()] = 0) -> Response:
    shares_of(request).revoke(share, principal.user, address=client_address(request))
    return redirect("/account/shares")


@router.post("/account/deidentified")
def deidentified_download(request: Request, principal: Physician, study: FormValue = "",
                          profile: FormValue = "", project: FormValue = "",
                          accept_burned_in: FormValue = "") -> Response:
    """The study, de-identified, as a ZIP (the same workflow as ``export --deidentify``)."""
    _ = gettext(request)
    vault = vault_of(request)
    items = _items(vault, study.strip()) if study.strip() else []
    if not items or profile not in PROFILES:
        return shares_page(request, principal, 400,
                           message=_("No study with this UID, or no profile chosen."))
    request_ = deid.Request(project=project, profile=PROFILES[profile],
                            accept_burned_in=bool(accept_burned_in),
                            actor_user=principal.user, actor_address=client_address(request),
                            destination="web download")
    try:
        data = _zip(vault, items, request_)
    except deid.BurnedInRefused:
        return shares_page(request, principal, 400, message=_(
            "Some images of this study may show the patient's name in their pixels "
            "(ultrasound, screenshots, burned-in text); they are not cleaned. Tick the "
            "confirmation to export them anyway."))
    except deid.DeidentifyError:
        return shares_page(request, principal, 400,
                           message=_("A project name is 1 to 64 characters."))
    return _zip_response(data)


def _zip(vault: Vault, items: list[StoredInstance], request: deid.Request) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        deid.export(vault, items, request, archive.writestr)
    return buffer.getvalue()


def _zip_response(data: bytes) -> Response:
    return Response(data, media_type="application/zip", headers={
        **NO_STORE, "Content-Disposition": 'attachment; filename="study.zip"'})


# --- the colleague's side --------------------------------------------------------------


def _not_valid(request: Request) -> HTTPException:
    return HTTPException(404, NOT_VALID)


def _ended(request: Request, link: str) -> Response | None:
    """To the link's "ended" page when this browser's session of it ended under it."""
    if len(link) <= MAX_LINK and ended_share(request, link) is not None:
        return redirect(f"/share/{link}/ended")
    return None


@router.get("/share/{link}")
def share_entry(request: Request, link: str) -> Response:
    shares = shares_of(request)
    if len(link) <= MAX_LINK and session_share(request, link) is not None:
        return redirect(f"/share/{link}/study")
    ended = _ended(request, link)
    if ended is not None:
        return ended
    if len(link) > MAX_LINK or not shares.exists(link):
        raise _not_valid(request)
    return page(request, "share_code.html", link=link, message="", headers=NO_STORE)


@router.post("/share/{link}")
def share_code(request: Request, link: str,
               code: Annotated[str, Form(max_length=64)] = "") -> Response:
    _ = gettext(request)
    shares = shares_of(request)
    if len(link) > MAX_LINK or not shares.exists(link):
        raise _not_valid(request)
    opening = shares.open(link, code, client_address(request))
    if opening.ok:
        response = redirect(f"/share/{link}/study")
        value = cookie_value(link, opening.session)
        response.headers["Set-Cookie"] = (f"{COOKIE}={value}; Path=/; Secure; "
                                          "HttpOnly; SameSite=Strict")
        return response
    if opening.retry_after > 0:
        seconds = int(opening.retry_after + 0.999)
        return page(request, "share_code.html", 429, link=link, headers={
            **NO_STORE, "Retry-After": str(seconds)}, message=_(
                "Too many wrong codes. Try again in %(seconds)s seconds.") % {
                    "seconds": seconds})
    if not shares.exists(link):  # that was the last allowed attempt
        raise _not_valid(request)
    return page(request, "share_code.html", 400, link=link, headers=NO_STORE,
                message=_("This code is not the right one."))


def _session_share(request: Request, link: str) -> Share:
    """The share this browser's share session opens, for this link; else 401."""
    found = session_share(request, link) if len(link) <= MAX_LINK else None
    if found is None:
        raise HTTPException(401, NOT_VALID)
    return found[1]


@router.get("/share/{link}/study")
async def share_study(request: Request, link: str) -> Response:
    """OHIF on the one study (its page records the opening), or, without an installed
    viewer, the rendered images. ``/viewer`` carries no UID: the share session's OHIF
    configuration names the study (``viewer.config_script``)."""
    ended = await run_in_threadpool(_ended, request, link)
    if ended is not None:
        return ended
    share = await run_in_threadpool(_session_share, request, link)
    if viewer.served(request) is not None:
        return redirect("/viewer")
    vault = vault_of(request)
    items = await run_in_threadpool(_items, vault, share.study)
    await run_in_threadpool(shares_of(request).opened, share, client_address(request),
                            "study")
    series: list[dict[str, object]] = []
    index: dict[str, dict[str, object]] = {}
    for n, item in enumerate(items):
        entry = index.get(item.series_uid)
        if entry is None:
            entry = {"number": len(series) + 1, "images": []}
            index[item.series_uid] = entry
            series.append(entry)
        if item.frames:
            images = entry["images"]
            assert isinstance(images, list)
            images.append(n)
    return page(request, "share_study.html", link=link, series=series, share=share,
                headers=NO_STORE)


@router.get("/share/{link}/ended")
def share_ended(request: Request, link: str) -> Response:
    """The colleague's page when the link expired or was revoked while they had it open:
    which of the two, and whom to ask. Only the browser that held the session is told
    why (``ShareLinks.ended``); any other gets "not valid" (404). The URL carries the
    opaque link id only. The stale cookie stays (it opens nothing): a later reload of the
    viewer comes here again rather than to the staff sign-in page."""
    found = ended_share(request, link) if len(link) <= MAX_LINK else None
    reason = found[1] if found is not None else ""
    return page(request, "share_ended.html", 410 if reason else 404, reason=reason,
                headers=NO_STORE)


@router.post("/share/{link}/signout")
def share_signout(request: Request, link: str) -> Response:
    """The viewer's "Sign out" for a share session: the session ends on the server
    (``ShareLinks.sign_out``) and the cookie goes (the code was single-use: opening the
    study again takes a new link)."""
    _session_share(request, link)
    shares_of(request).sign_out(link, cookie_parts(request)[1])
    response = redirect(f"/share/{link}")
    response.headers["Set-Cookie"] = (f"{COOKIE}=; Path=/; Secure; HttpOnly; "
                                      "SameSite=Strict; Max-Age=0")
    return response


def _render(vault: Vault, item: StoredInstance) -> bytes:
    ds = wado.read_dataset(vault.archive.read(item))
    return render.render(ds, 0, render.RenderOptions(media_type="image/jpeg",
                                                     viewport=(1024, 1024)))


@router.get("/share/{link}/image/{n}")
async def share_image(request: Request, link: str, n: int) -> Response:
    share = await run_in_threadpool(_session_share, request, link)
    vault = vault_of(request)
    items = await run_in_threadpool(_items, vault, share.study)
    if not 0 <= n < len(items) or not items[n].frames:
        raise HTTPException(404, N_("No such image."))
    await run_in_threadpool(shares_of(request).opened, share, client_address(request),
                            "image")
    try:
        data = await run_in_threadpool(_render, vault, items[n])
    except render.RenderError:
        raise HTTPException(404, N_("This image cannot be shown here.")) from None
    return Response(data, media_type="image/jpeg", headers=NO_STORE)


@router.get("/share/{link}/download")
async def share_download(request: Request, link: str) -> Response:
    share = await run_in_threadpool(_session_share, request, link)
    if not share.download:
        raise HTTPException(403, N_("Downloading was not allowed for this share."))
    vault = vault_of(request)
    items = await run_in_threadpool(_items, vault, share.study)
    address = client_address(request)
    if share.deidentify:
        # the physician confirmed burned-in objects when making the link (create_share)
        job = deid.Request(project=share.project, profile=PROFILES[share.deidentify],
                           accept_burned_in=True, actor_user=f"share:{share.pk}",
                           actor_address=address, destination="share link")
        await run_in_threadpool(shares_of(request).opened, share, address, "download",
                                export=True)
        data = await run_in_threadpool(_zip, vault, items, job)
    else:
        await run_in_threadpool(shares_of(request).opened, share, address, "download",
                                export=True)
        data = await run_in_threadpool(_identified_zip, vault, items)
    return _zip_response(data)


def _identified_zip(vault: Vault, items: list[StoredInstance]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for n, item in enumerate(items):
            archive.writestr(f"study/{n + 1:05d}.dcm", vault.archive.read(item))
    return buffer.getvalue()


# --- listings on the account and Health pages ------------------------------------------


def account_shares(request: Request, principal: Principal) -> dict[str, object] | None:
    """The physician's links for the account page (None for other roles: no section)."""
    if "physician" not in principal.roles:
        return None
    shares = shares_of(request)
    return {"shares": shares.mine(principal.user), "now": shares.clock()}


def active_shares(request: Request) -> list[Share]:
    """Every usable link, for the Health page (owner, expiry, kind; never the study)."""
    return shares_of(request).active()
