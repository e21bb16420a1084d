"""The record of processing activities (GDPR art. 30): ``pacsvault gdpr record`` and the
administration / audit page print the archive's entry, pre-filled from the live
configuration (``facts``) in French or English, as Markdown or PDF (``record``).

Every export is an audit event (``gdpr.record.export``: who, language, format; the
document holds no patient data, so the event carries no reference either): a DPO's copy
is dated, and the trail shows which version was handed over when.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.documents import Document
from pacsvault.gdpr.facts import Facts, gather
from pacsvault.gdpr.record import LANGUAGES, document

if TYPE_CHECKING:
    from pacsvault.vault import Vault

FORMATS = ("md", "pdf")
ACTION = "gdpr.record.export"


def build(vault: Vault, lang: str, now: dt.datetime | None = None) -> Document:
    """The entry of ``vault`` as it is configured now (nothing recorded: see ``record``)."""
    return document(gather(vault, now), lang)


def record(vault: Vault, *, lang: str, fmt: str, by: str, address: str = "",
           via: str = "cli") -> None:
    """Record that the entry was exported (or shown, ``fmt`` "html") by ``by``."""
    vault.recorder.emit(AuditEvent(
        action=ACTION, outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
        actor_user=by, actor_address=address,
        message=f"The record of processing (GDPR art. 30) was exported ({lang}, {fmt}).",
        detail={"document": "gdpr-art30", "lang": lang, "format": fmt, "via": via},
    ))


def export(vault: Vault, *, lang: str, fmt: str, by: str, address: str = "",
           via: str = "cli") -> bytes:
    """The entry as Markdown (UTF-8) or PDF bytes, recorded once made."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    doc = build(vault, lang)
    data = doc.to_pdf() if fmt == "pdf" else doc.to_markdown().encode("utf-8")
    record(vault, lang=lang, fmt=fmt, by=by, address=address, via=via)
    return data


__all__ = ["ACTION", "FORMATS", "LANGUAGES", "Facts", "build", "document", "export",
           "gather", "record"]
