"""Numbers, sizes, dates and times as the reader writes them: the Jinja filters of every page.

One filter set for every template (``pages.environment`` installs them), so that no page
formats on its own:

* ``when``: a date and time, 24-hour, in the practice's time zone (French ``05/12/2026
  09:14``, English ``2026-12-05 09:14``: ISO order, unambiguous for an English reader
  whatever their country);
* ``day``: the date alone, same conventions;
* ``number``: a count with the language's separators (French ``12 345``, a narrow
  no-break space; English ``12,345``);
* ``size``: a size in bytes with decimal units (French ``10,5 Mo``, English ``10.5 MB``);
* ``groups``: a secret typed by hand, by groups of four (``ABCD EFGH``).

Babel does the locale work (CLDR data), the filters only choose patterns. The language and
the zone come from the template's context (``lang``, set by ``pages.render``; ``tz``, set by
``kit.page`` from ``[web] time_zone``), so the cached per-language environments need no
request. The time zone is the practice's, not the server's nor the browser's: a practice's
PC and its server may disagree (a cloud VM on UTC), the practice's wall clock does not.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

from babel.dates import format_datetime
from babel.numbers import format_decimal
from babel.units import format_unit
from jinja2 import pass_context
from jinja2.runtime import Context

DEFAULT_ZONE = "Europe/Paris"
_PATTERNS = {"fr": ("dd/MM/yyyy", "HH:mm"), "en": ("yyyy-MM-dd", "HH:mm")}
_UNITS = ((10**12, "digital-terabyte"), (10**9, "digital-gigabyte"),
          (10**6, "digital-megabyte"), (10**3, "digital-kilobyte"))
_BYTE = {"fr": "o", "en": "B"}


def zone(name: str) -> dt.tzinfo:
    """The zone of a setting (validated at load); UTC if the zone database lacks it."""
    try:
        return zoneinfo.ZoneInfo(name or DEFAULT_ZONE)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def _lang(language: str) -> str:
    return language if language in _PATTERNS else "en"


def datetime_text(value: dt.datetime | str | None, language: str, tz: dt.tzinfo,
                  *, with_time: bool = True) -> str:
    """``value`` in ``tz`` (naive times are UTC, as the stores keep them; a string is an
    ISO time as the audit trail writes it, shown as is if it is not one)."""
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
        value = parsed
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    lang = _lang(language)
    day, clock = _PATTERNS[lang]
    pattern = f"{day} {clock}" if with_time else day
    return format_datetime(value.astimezone(tz), pattern, locale=lang)


def number_text(value: float | int | None, language: str) -> str:
    if value is None:
        return ""
    return format_decimal(value, locale=_lang(language))


def size_text(value: float | int | None, language: str) -> str:
    """Decimal units (1 Mo = 10^6 octets), one decimal at most."""
    if value is None:
        return ""
    lang = _lang(language)
    for scale, unit in _UNITS:
        if abs(value) >= scale:
            return format_unit(round(value / scale, 1), unit, length="short", locale=lang)
    return f"{format_decimal(value, locale=lang)}\u202f{_BYTE[lang]}"


def _context_zone(context: Context) -> dt.tzinfo:
    found: Any = context.get("tz")
    return found if isinstance(found, dt.tzinfo) else zone(DEFAULT_ZONE)


@pass_context
def when_filter(context: Context, value: dt.datetime | str | None) -> str:
    return datetime_text(value, str(context.get("lang", "en")), _context_zone(context))


@pass_context
def day_filter(context: Context, value: dt.datetime | dt.date | None) -> str:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time(12), _context_zone(context))
    return datetime_text(value, str(context.get("lang", "en")), _context_zone(context),
                         with_time=False)


@pass_context
def number_filter(context: Context, value: float | int | None) -> str:
    return number_text(value, str(context.get("lang", "en")))


@pass_context
def size_filter(context: Context, value: float | int | None) -> str:
    return size_text(value, str(context.get("lang", "en")))


def groups(value: str, size: int = 4) -> str:
    """A secret to type by hand, in groups (``ABCD EFGH``): authenticator apps ignore the
    spaces, readers lose their place less."""
    return " ".join(value[i:i + size] for i in range(0, len(value), size))


FILTERS = {"when": when_filter, "day": day_filter, "number": number_filter,
           "size": size_filter, "groups": groups}
