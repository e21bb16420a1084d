"""Languages of pacsvault's own pages: gettext catalogs, and which one a request gets.

The catalogs are ``web/locale/<lang>/LC_MESSAGES/messages.po`` (English is the source
language: its ``msgstr`` are empty, so every message falls back to its English ``msgid``).
They are read with Babel and compiled in memory when first used: no build step, no ``.mo``
file to keep in sync.

Which language (``locale_for``), first match wins:

1. the signed-in user's choice on the account page (``accounts.preferences``; the session
   middleware reads it with the account, ``scope["state"]["language"]``);
2. the ``pvlang`` cookie set by the language switch of the sign-in pages;
3. ``Accept-Language`` (q-values honoured; ``fr-FR``, ``fr-CA``... are French);
4. English.

Templates use Jinja2's i18n extension (``{% trans %}``, ``_()``), one environment per
language (``pages.environment``). Python code marks its messages with ``_`` from
``gettext(request)`` (or ``N_`` where the text is translated later) so that extraction
finds them (``locale/babel.cfg``; see ``tests/test_i18n.py``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations
from starlette.requests import HTTPConnection

from pacsvault.web.headers import weighted

LANGUAGES = ("fr", "en")
DEFAULT = "en"
NAMES = {"fr": "Français", "en": "English"}  # each in its own language
COOKIE = "pvlang"
COOKIE_MAX_AGE = 365 * 24 * 3600
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
DOMAIN = "messages"
STATE_KEY = "pv_locale"

Gettext = Callable[[str], str]


def N_(message: str) -> str:  # the gettext convention
    """Mark a message for extraction; it is translated where it is shown."""
    return message


def catalog_path(language: str) -> Path:
    return LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"


@cache
def translations(language: str) -> Translations:
    """The compiled catalog of a language (fuzzy entries are left out, as msgfmt does)."""
    if language not in LANGUAGES:
        language = DEFAULT
    with open(catalog_path(language), "rb") as fh:
        catalog = read_po(fh, locale=language, domain=DOMAIN)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return Translations(buffer, domain=DOMAIN)


def gettext_for(language: str) -> Gettext:
    return translations(language).gettext


def negotiate(accept_language: str) -> str | None:
    """The best of ``LANGUAGES`` for an ``Accept-Language`` header, or None: highest q
    first, the header's order breaking ties (``headers.weighted``; its first 32 items)."""
    for item in weighted(accept_language, limit=32):
        primary = item.value.split("-", 1)[0]
        if primary in LANGUAGES:
            return primary
    return None


def normalise(value: str | None) -> str:
    """A language code we have, or ""."""
    value = (value or "").strip().lower()
    return value if value in LANGUAGES else ""


def locale_for(request: HTTPConnection) -> str:
    """"fr" or "en" for this request (see the module docstring for the order)."""
    state = request.scope.get("state", {})
    cached = state.get(STATE_KEY)
    if isinstance(cached, str):
        return cached
    chosen = (normalise(state.get("language"))
              or normalise(request.cookies.get(COOKIE))
              or negotiate(request.headers.get("accept-language", ""))
              or DEFAULT)
    if isinstance(state, dict):
        state[STATE_KEY] = chosen
    return chosen


def gettext(request: HTTPConnection) -> Gettext:
    """The ``_`` of a request: ``_ = gettext(request)``, then ``_("Sentence.")``."""
    return gettext_for(locale_for(request))


def cookie_header(language: str) -> str:
    """Set-Cookie for the sign-in pages' language switch (not a secret, not HttpOnly-worthy
    but kept so anyway; Strict like the session)."""
    return (f"{COOKIE}={language}; Path=/; Max-Age={COOKIE_MAX_AGE}; Secure; HttpOnly; "
            "SameSite=Strict")


def languages() -> Mapping[str, str]:
    return NAMES
