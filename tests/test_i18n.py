"""The gettext catalogs of the web pages are complete and in sync with the code.

Every message marked in the templates (``_()``, ``{% trans %}``) and in the Python of
``pacsvault.web`` (``_``, ``N_``, ``gettext``) is extracted here with Babel, through the
same ``locale/babel.cfg`` as ``pybabel extract``, and compared with
``locale/{fr,en}/LC_MESSAGES/messages.po``:

* both catalogs hold exactly the extracted messages (none missing, none left over);
* every French entry has a non-empty, non-fuzzy translation with the same placeholders
  (``{name}`` and ``%(name)s``), and the catalogs compile (as the server does, in memory).

When this fails after adding a string: run the two ``pybabel`` commands at the top of
``locale/babel.cfg``, then translate the new French entries.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

from pacsvault.web import i18n, pages

WEB = Path(i18n.__file__).resolve().parent
CONFIG = WEB / "locale" / "babel.cfg"
PLACEHOLDER = re.compile(r"\{[a-z_]+\}|%\([a-z_]+\)s")


def extracted() -> set[str]:
    with open(CONFIG) as fh:
        method_map, options_map = parse_mapping_cfg(fh, filename=str(CONFIG))  # type: ignore[no-untyped-call]
    found: set[str] = set()
    for _filename, _lineno, message, _comments, _context in extract_from_dir(
            str(WEB), method_map, options_map):
        ids = message if isinstance(message, tuple) else (message,)
        found.update(m for m in ids if m)
    return found


@pytest.fixture(scope="module")
def messages() -> set[str]:
    found = extracted()
    assert len(found) > 150  # the extraction sees templates and Python alike
    assert "Sign in" in found and "Wrong user name, password or code." in found
    assert "DICOM devices" in found  # a template
    assert "The two new passwords differ." in found  # Python, _()
    assert "The passkey could not be used." in found  # Python, N_()
    return found


@pytest.mark.parametrize("language", i18n.LANGUAGES)
def test_catalog_holds_exactly_the_extracted_messages(language: str,
                                                      messages: set[str]) -> None:
    with open(i18n.catalog_path(language), "rb") as fh:
        catalog = read_po(fh, locale=language)
    ids = {m.id for m in catalog if m.id and isinstance(m.id, str)}
    assert not messages - ids, f"missing in {language}: {sorted(messages - ids)}"
    assert not ids - messages, f"obsolete in {language}: {sorted(ids - messages)}"
    assert not catalog.obsolete, sorted(catalog.obsolete)


def test_every_message_has_a_french_translation(messages: set[str]) -> None:
    with open(i18n.catalog_path("fr"), "rb") as fh:
        catalog = read_po(fh, locale="fr")
    problems = []
    for entry in catalog:
        if not entry.id:
            continue
        text = entry.string if isinstance(entry.string, str) else ""
        if not text.strip() or entry.fuzzy:
            problems.append(f"untranslated: {entry.id!r}")
            continue
        if sorted(PLACEHOLDER.findall(str(entry.id))) != sorted(PLACEHOLDER.findall(text)):
            problems.append(f"placeholders differ: {entry.id!r} -> {text!r}")
        if "'" in text:  # French typography: the apostrophe is ’
            problems.append(f"straight apostrophe: {text!r}")
    assert not problems, "\n".join(problems)
    gettext = i18n.translations("fr").gettext
    assert all(gettext(m) for m in messages)
    assert gettext("Studies") == "Examens" and gettext("physician") == "praticien"


def test_english_is_the_source_language() -> None:
    with open(i18n.catalog_path("en"), "rb") as fh:
        catalog = read_po(fh, locale="en")
    assert all(not m.string for m in catalog if m.id)  # msgid is the text
    gettext = i18n.translations("en").gettext
    assert gettext("Wrong user name, password or code.") == \
        "Wrong user name, password or code."


def test_templates_compile_in_both_languages() -> None:
    for language in i18n.LANGUAGES:
        env = pages.environment(language)
        for template in (WEB / "templates").glob("*.html"):
            env.get_template(template.name)  # syntax, extensions, includes
