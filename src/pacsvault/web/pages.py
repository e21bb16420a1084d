"""Server-rendered pages: the Jinja2 environment, the static files, generic error pages.

Templates live in ``web/templates`` (autoescaped), the one style sheet in ``web/static``;
the Content-Security-Policy allows no inline script or style, so pages have none. Error
pages say what kind of problem it was and nothing else: no exception text, no stack
trace, no version.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Scope

from pacsvault.web.strings import catalogue

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".js": "text/javascript; charset=utf-8"}
DICOMWEB_PREFIX = "/dicom-web"


def when(value: dt.datetime | None) -> str:
    """A time as pages show it: UTC, to the minute."""
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@cache
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    return env


def render(template: str, context: Mapping[str, Any], status: int = 200,
           headers: Mapping[str, str] | None = None, accept_language: str = "") -> HTMLResponse:
    defaults: dict[str, Any] = {"t": catalogue(accept_language), "principal": None, "csrf": "",
                                "message": "", "message_kind": "error"}
    page = environment().get_template(template).render({**defaults, **context})
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

    ``message`` must be a fixed, user-facing sentence (never an exception's text); when
    empty, the generic sentence for the status is used.
    """
    t = catalogue(Headers(scope=scope).get("accept-language", ""))
    text = message or t.get(f"error_{status}", t["error_other"])
    if wants_html(scope):
        return render("error.html", {"status": status, "message": text}, status, headers)
    return JSONResponse({"error": text}, status_code=status, headers=dict(headers or {}))
