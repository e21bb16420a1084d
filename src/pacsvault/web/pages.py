"""Server-rendered pages: the Jinja2 environments, the static files, generic error pages.

Templates live in ``web/templates`` (autoescaped, Jinja2's i18n extension: one environment
per language, see ``i18n``), the style sheet and scripts in ``web/static``; the
Content-Security-Policy allows no inline script or style, so pages have none. Error pages
say what kind of problem it was and nothing else: no exception text, no stack trace, no
version.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Scope

from pacsvault.web import formats, i18n
from pacsvault.web.i18n import N_

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".js": "text/javascript; charset=utf-8"}
DICOMWEB_PREFIX = "/dicom-web"


# Options shared with the extraction (``locale/babel.cfg`` says the same).
JINJA_OPTIONS: dict[str, Any] = {"trim_blocks": True, "lstrip_blocks": True,
                                 "extensions": ["jinja2.ext.i18n"]}
GENERIC_ERRORS = {
    400: N_("The request is not valid."),
    401: N_("Please sign in."),
    403: N_("You are not allowed to do this."),
    404: N_("Not found."),
    405: N_("Not allowed here."),
    413: N_("The request is too large."),
    429: N_("Too many requests. Try again later."),
    500: N_("Something went wrong. The problem was recorded."),
}
OTHER_ERROR = N_("The request could not be completed.")
# Details other modules give to HTTPException (app.py, DICOMweb) that pages may show.
KNOWN_DETAILS = (N_("not found"), N_("invalid request"), N_("internal error"))


@cache
def environment(language: str = i18n.DEFAULT) -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        **JINJA_OPTIONS,
    )
    env.install_gettext_translations(i18n.translations(language),  # type: ignore[attr-defined]
                                     newstyle=True)
    env.filters.update(formats.FILTERS)  # when, day, number, size: see ``formats``
    return env


def render(template: str, context: Mapping[str, Any], status: int = 200,
           headers: Mapping[str, str] | None = None,
           language: str = i18n.DEFAULT) -> HTMLResponse:
    defaults: dict[str, Any] = {"lang": language, "languages": i18n.NAMES, "principal": None,
                                "csrf": "", "message": "", "message_kind": "error",
                                "field_errors": {}, "nav": "", "admin_nav": "", "here": "/",
                                "tz": formats.zone(formats.DEFAULT_ZONE)}
    page = environment(language).get_template(template).render({**defaults, **context})
    return HTMLResponse(page, status_code=status, headers=dict(headers or {}))


@cache
def static_file(name: str) -> tuple[bytes, str] | None:
    """(content, media type) of a file of ``web/static``, by bare name only."""
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    path = STATIC / name
    media = STATIC_TYPES.get(path.suffix)
    if media is None or not path.is_file():
        return None
    return path.read_bytes(), media


def wants_html(scope: Scope) -> bool:
    """A browser page (not DICOMweb, Accept names text/html)."""
    if str(scope.get("path", "")).startswith(DICOMWEB_PREFIX):
        return False
    return "text/html" in Headers(scope=scope).get("accept", "")


def error_response(scope: Scope, status: int, message: str = "",
                   headers: Mapping[str, str] | None = None) -> Response:
    """A generic error: an HTML page for browsers, ``{"error": ...}`` for the rest.

    ``message`` must be a fixed, user-facing sentence (never an exception's text), in
    English: it is translated when the catalog has it; when empty, the generic sentence for
    the status is used.
    """
    language = i18n.locale_for(HTTPConnection(scope))
    _ = i18n.gettext_for(language)
    text = _(message or GENERIC_ERRORS.get(status, OTHER_ERROR))
    if wants_html(scope):
        state = scope.get("state", {})
        session = state.get("web_session")
        return render("error.html", {"status": status, "message": text,
                                     "principal": state.get("principal"),
                                     "csrf": getattr(session, "csrf", "")},
                      status, headers, language)
    return JSONResponse({"error": text}, status_code=status, headers=dict(headers or {}))
