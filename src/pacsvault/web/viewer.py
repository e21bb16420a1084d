"""Serve the OHIF viewer same-origin, behind the session.

Why same-origin and behind the session: every request OHIF makes (its code, and above all
the QIDO/WADO calls for images) then carries the session cookie, so it is authenticated and
recorded like any other access; no token ever sits in the browser's storage.

OHIF's build expects to live at ``/`` of its origin (absolute asset links), so it does:
``/`` is its study list, ``/viewer?StudyInstanceUIDs=...`` its viewer, and its files are
answered by a catch-all route registered after every other one. pacsvault's own pages keep
their paths (``/login``, ``/account``, ``/admin/...``, ``/audit``, ``/dicom-web``).

The Content-Security-Policy on OHIF's pages is the strictest it runs under (it needs
``'unsafe-eval'`` for its image-loader worker and two inline scripts, allowed by hash,
computed from the served file); every other page keeps the strict default.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from functools import cache, lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response

from pacsvault.viewer import ViewerDist, load, ohif_modes, ohif_strings
from pacsvault.web import pages, share_scope
from pacsvault.web.i18n import NAMES, gettext_for, locale_for
from pacsvault.web.kit import session_of
from pacsvault.web.principal import Principal

router = APIRouter(include_in_schema=False)

READER_ROLE = "physician"
# Client-side routes of OHIF that must answer its index page (no file extension).
_CONTENT_HASHED = re.compile(r"[0-9a-f]{16,}")
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
_MEDIA_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
    ".wasm": "application/wasm", ".json": "application/json", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2",
    ".woff": "font/woff", ".ttf": "font/ttf", ".html": "text/html; charset=utf-8",
    ".xml": "application/xml", ".txt": "text/plain; charset=utf-8",
}


_OHIF_CSS = b'<link rel="stylesheet" href="/static/ohif.css">'


def viewer_csp(inline_hashes: list[str]) -> str:
    hashes = " ".join(f"'sha256-{h}'" for h in inline_hashes)
    return ("default-src 'self'; "
            f"script-src 'self' 'wasm-unsafe-eval' 'unsafe-eval' {hashes}; "
            "worker-src 'self' blob:; img-src 'self' data: blob:; "
            "style-src 'self' 'unsafe-inline'; font-src 'self' data:; "
            "connect-src 'self' blob: data:; media-src 'self' blob:; object-src 'none'; "
            "base-uri 'self'; form-action 'self'; frame-ancestors 'none'")


class ServedViewer:
    """The installed distribution plus what is computed once from it."""

    def __init__(self, dist: ViewerDist) -> None:
        self.dist = dist
        page = (dist.root / "index.html").read_bytes()
        self.index = page
        hashes = [base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode("ascii")
                  for m in _INLINE_SCRIPT.finditer(page)]
        self.headers = {
            "Content-Security-Policy": viewer_csp(hashes),
            "Cross-Origin-Opener-Policy": "same-origin",
            # Needed by OHIF for SharedArrayBuffer (multi-threaded decoding).
            "Cross-Origin-Embedder-Policy": "require-corp",
            "Cache-Control": "no-store",
        }

    def page(self, practice: str) -> bytes:
        """OHIF's index page with the practice's name in the tab and pacsvault's phone and
        tablet layout linked (nothing else changes: the inline scripts keep their hashes)."""
        title = html.escape(practice, quote=False).encode("utf-8")
        page = self.index.replace(b"<title>OHIF Viewer</title>",
                                  b"<title>" + title + b"</title>")
        # pacsvault's layout for phones and tablets (static/ohif.css), last in <head>.
        return page.replace(b"</head>", _OHIF_CSS + b"</head>", 1)


@lru_cache(maxsize=4)
def _served(directory: str) -> ServedViewer | None:
    dist = load(Path(directory) if directory else None)
    return ServedViewer(dist) if dist is not None else None


def served(request: Request) -> ServedViewer | None:
    return _served(request.app.state.vault.settings.web.viewer_dir)


def pacsvault_block(locale: str, *, practice: str, csrf: str, admin: bool,
                    modes: list[str]) -> dict[str, Any]:
    """What the script of ``viewer_assets/app-config.js`` needs to put pacsvault inside
    OHIF: the header (practice name, menu labels in the user's language, the session's CSRF
    token for sign-out and the language switch), the modes to hide, OHIF's strings."""
    _ = gettext_for(locale)
    return {
        "practice": practice,
        "csrf": csrf,
        "locale": locale,
        "ohifLanguages": ohif_strings.OHIF_LANGUAGE,
        "languages": dict(NAMES),
        "admin": admin,
        "labels": {"menu": _("Menu"), "account": _("Account"),
                   "admin": _("Administration"), "language": _("Language"),
                   "signOut": _("Sign out"), "media": _("Download / patient CD"),
                   "send": _("Send to…"), "share": _("Share…"),
                   "studies": _("Study actions"),
                   "studyActions": _("Download, send, share…")},
        "hiddenModes": ohif_modes.hidden(modes),
        "firstModes": [ohif_modes.BASIC],
        "strings": ohif_strings.overrides(),
    }


def share_block(block: dict[str, Any], locale: str, link: str, study: str,
                download: bool) -> dict[str, Any]:
    """A share session's OHIF (issue 19): its one study, named here rather than in any URL
    the server sees (the script puts it in OHIF's client-side route), the share's own exit
    and download, and no menu entry of an account (``app-config.js``)."""
    _ = gettext_for(locale)
    block["share"] = {"study": study, "entry": f"/share/{link}",
                      "signOut": f"/share/{link}/signout",
                      "download": f"/share/{link}/download" if download else "",
                      "downloadLabel": _("Download the study (ZIP)")}
    return block


def app_config(locale: str, block: dict[str, Any] | None = None) -> str:
    """OHIF's ``window.config``: one data source, pacsvault's DICOMweb, same origin, in the
    script of ``viewer_assets/app-config.js`` (which adds the pacsvault extension, header
    and hidden modes from ``block``).

    ``httpErrorHandler`` is OHIF's hook for failed DICOMweb calls: an expired session
    (401) goes to the sign-in page with the current study as ``next``, so nothing is lost.
    """
    if block is None:
        block = pacsvault_block(locale, practice="pacsvault", csrf="", admin=False,
                                modes=[])
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "pacsvault",
            "name": "pacsvault",
            "wadoUriRoot": "/dicom-web",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "supportsStow": False,
            "dicomUploadEnabled": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config: dict[str, Any] = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        # a share session has no study list: its one study only (``share_block``)
        "showStudyList": "share" not in block,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "showErrorDetails": "never",
        "maxNumRequests": {"interaction": 100, "thumbnail": 75, "prefetch": 25},
        # The "investigational use" banner: pacsvault's deployment is the practice's call.
        "investigationalUseDialog": {"option": "never"},
        # No onboarding tour popping over the first image a doctor opens.
        "customizationService": {"ohif.tours": {"$set": []}},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [data_source],
    }
    values = {"config": json.dumps(config, indent=1), "locale": json.dumps(locale),
              "pacsvault": _script_json(block)}
    # One pass: a value is never searched for markers itself.
    return _MARKER.sub(lambda m: values[m.group(1)], _config_template())


# The script around ``window.config`` (sign-in on 401, OHIF workarounds), kept as a static
# file of the package so it reads, diffs and lints as JavaScript. A marker is a comment
# followed by a stand-in value, so the file itself is valid JavaScript.
_MARKER = re.compile(r'/\*@(config|locale|pacsvault)@\*/(?:\{\}|"en")')


def _script_json(value: Any) -> str:
    """JSON safe inside a script: a practice name holding ``</script>`` or U+2028 stays
    a string."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@cache
def _config_template() -> str:
    return (files("pacsvault.web") / "viewer_assets" / "app-config.js").read_text(
        encoding="utf-8")


def _principal(request: Request) -> Principal | None:
    """The signed-in user, else a share session (``share_scope``: OHIF on its one study,
    whose DICOMweb reads are scoped to it), else None. These routes are sync: a thread."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        principal = share_scope.share_principal(request)
    return principal


def _next_url(request: Request) -> str:
    """Sign-in, then back here. The study list keeps its search filters (patient names)
    in its query string: those are dropped, only a viewer URL (study UIDs) is kept."""
    target = request.url.path
    if request.url.query and target != "/":
        target += "?" + request.url.query
    return "/login?next=" + quote(target, safe="")


def _elsewhere(principal: Principal) -> str:
    """Where a signed-in user without the reader role belongs."""
    if principal.has("admin"):
        return "/admin/health"
    if principal.has("auditor"):
        return "/audit"
    return "/account"


def _not_installed(request: Request) -> Response:
    return pages.error_response(
        request.scope, 503,
        "The image viewer is not installed on this server. Your IT provider can install "
        "it with: pacsvault viewer install",
    )


def _signed_out(request: Request) -> Response:
    """No one here: a share session that ended under its colleague (expired or revoked
    while the viewer was open) goes to its link's page saying so; others to sign-in."""
    ended = share_scope.ended_location(request)
    return RedirectResponse(ended or _next_url(request), status_code=303)


def _index(request: Request) -> Response:
    principal = _principal(request)
    if principal is None:
        return _signed_out(request)
    if not principal.share and not principal.has(READER_ROLE):
        return RedirectResponse(_elsewhere(principal), status_code=303)
    viewer = served(request)
    if viewer is None:
        return _not_installed(request)
    if principal.share:
        found = share_scope.session_share(request)
        if found is None:
            raise HTTPException(401, "authentication required")
        # every opening of the viewer, in the trail as the share's (fail closed)
        share_scope.shares_of(request).opened(found[1], principal.address, "viewer")
    practice = request.app.state.vault.settings.web.practice_name
    response = Response(viewer.page(practice), media_type="text/html; charset=utf-8",
                        headers=viewer.headers)
    # OHIF's language detector reads this cookie first (then the browser's languages).
    response.set_cookie("i18next", locale_for(request), path="/", secure=True,
                        samesite="strict")
    return response


@router.get("/")
def study_list(request: Request) -> Response:
    return _index(request)


@router.get("/app-config.js")
def config_script(request: Request) -> Response:
    principal = _principal(request)
    if principal is None:
        raise HTTPException(401, "authentication required")
    web = request.app.state.vault.settings.web
    session = session_of(request)
    locale = locale_for(request)
    block = pacsvault_block(locale, practice=web.practice_name,
                            csrf=getattr(session, "csrf", ""), admin=principal.has("admin"),
                            modes=list(web.viewer_modes))
    if principal.share:
        found = share_scope.session_share(request)
        if found is None:
            raise HTTPException(401, "authentication required")
        link, share = found
        block = share_block(block, locale, link, share.study, share.download)
    # It holds the session's CSRF token: never cached, never readable cross-origin (the
    # session cookie is SameSite=Strict, and CORP keeps other sites from embedding it).
    return Response(app_config(locale, block), media_type="text/javascript",
                    headers={"Cache-Control": "no-store",
                             "Cross-Origin-Resource-Policy": "same-origin"})


def _gzip_twin(viewer: ServedViewer, relative: str) -> Path | None:
    """The ``.gz`` twin of a file, looked up exactly like the file itself (resolved, inside
    the install: ``ViewerDist.file``) and never a symbolic link: the installer writes twins
    as plain files, so a link is something planted to serve a file from elsewhere."""
    twin = relative + ".gz"
    found = viewer.dist.file(twin)
    if found is None or viewer.dist.root.joinpath(*twin.split("/")).is_symlink():
        return None
    return found


def _asset(request: Request, viewer: ServedViewer, path: Path, relative: str) -> Response:
    media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    cache = ("private, max-age=31536000, immutable" if _CONTENT_HASHED.search(path.name)
             else "private, max-age=3600")
    headers = {"Cache-Control": cache, "Vary": "Accept-Encoding",
               "Cross-Origin-Resource-Policy": "same-origin"}
    if path.suffix in (".js", ".mjs"):
        # Workers are documents of their own: they need the viewer's policy too.
        headers["Content-Security-Policy"] = viewer.headers["Content-Security-Policy"]
        headers["Cross-Origin-Embedder-Policy"] = "require-corp"
    packed = _gzip_twin(viewer, relative)
    if "gzip" in request.headers.get("accept-encoding", "") and packed is not None:
        headers["Content-Encoding"] = "gzip"
        return FileResponse(packed, media_type=media_type, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)


@router.get("/{path:path}")
def viewer_files(request: Request, path: str) -> Response:
    """OHIF's files, and its client-side routes (``/viewer`` ...). Registered last."""
    segments = path.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in segments):
        raise HTTPException(404, "not found")
    if path == "index.html":
        return RedirectResponse("/", status_code=303)
    principal = _principal(request)
    is_route = "." not in segments[-1]
    if principal is None:
        if is_route:
            return _signed_out(request)
        raise HTTPException(401, "authentication required")
    if is_route:
        return _index(request)
    viewer = served(request)
    if viewer is None:
        raise HTTPException(404, "not found")
    found = viewer.dist.file(path)
    if found is None:
        raise HTTPException(404, "not found")
    return _asset(request, viewer, found, path)
