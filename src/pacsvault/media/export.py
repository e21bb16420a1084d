"""A media export: select, record the disclosure, then hand out the files one by one.

Shared by ``pacsvault export --media DIR`` (each file written to the folder) and the
physician's ZIP download (each file written into a ZIP streamed to the browser). The order
is the identified export's (``cli/export.py``): everything that can refuse does so first,
then the disclosure is recorded durably (fail closed: no record, no byte), then the files
follow. Each instance is decrypted into memory once, listed in the DICOMDIR from its header
and handed out with its stored bytes unchanged; the DICOMDIR and the listing come last,
once every instance is known (a ZIP has no order, a folder is only complete at the end).
Quarantined instances (hidden by an administrator) stay out: the media holds what the
physicians see.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.index.models import Instance
from pacsvault.index.records import StoredInstance
from pacsvault.media.fileset import MediaError, MediaFileSet
from pacsvault.media.listing import Listing, index_html, readme

if TYPE_CHECKING:
    from pacsvault.vault import Vault

DICOMDIR = "DICOMDIR"
INDEX = "INDEX.HTM"
README = "README.TXT"
ACTION = "export.media"


@dataclass(frozen=True)
class Request:
    """Who exports, to where; ``lang`` is the listing's language (en or fr)."""

    actor_user: str = "local-admin"
    actor_address: str = ""
    destination: str = "local folder"
    lang: str = "fr"


def select_items(vault: Vault, *, study_uid: str | None = None,
                 patient_id: str | None = None) -> list[StoredInstance]:
    """The instances of one study or one patient, without the quarantined ones."""
    if not study_uid and not patient_id:
        return []
    items = list(vault.archive.locate(study_uid=study_uid or None,
                                      patient_id=None if study_uid else patient_id))
    with vault.sessions() as session:
        hidden = set(session.scalars(
            select(Instance.sop_uid).where(Instance.quarantined.is_not(None))))
    return [i for i in items if i.sop_uid not in hidden]


class MediaExport:
    """One export, recorded at construction (raises ``AuditUnavailable`` if the trail
    cannot take it; ``MediaError`` if there is nothing to export)."""

    def __init__(self, vault: Vault, items: list[StoredInstance], request: Request) -> None:
        if not items:
            raise MediaError("nothing matches; no file was written")
        self.vault, self.items, self.request = vault, items, request
        self.studies = len({i.study_uid for i in items})
        self.patients = len({i.patient_id for i in items})
        self.total = sum(i.size for i in items)  # the instances' bytes, for progress
        self._record()

    def _record(self) -> None:
        """The disclosure, durable before any file exists: counts, the user and the
        destination readable; which patient, studies and instances sealed in the refs."""
        owners = {i.study_uid: i.patient_id for i in self.items}
        self.vault.recorder.emit(AuditEvent(
            action=ACTION, outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
            actor_user=self.request.actor_user, actor_address=self.request.actor_address,
            study_uids=tuple(sorted(owners)),
            patient_ids=tuple(sorted(set(owners.values()))),
            sop_uids=tuple(i.sop_uid for i in self.items), study_patients=owners,
            sop_studies={i.sop_uid: i.study_uid for i in self.items},
            detail={"instances": len(self.items), "studies": self.studies,
                    "patients": self.patients, "format": "DICOMDIR",
                    "destination": self.request.destination}),
            required=True)

    def files(self) -> Iterator[tuple[str, bytes]]:
        """(relative path, content): every instance as stored, then DICOMDIR, INDEX.HTM
        and README.TXT. Paths use ``/``."""
        fileset = MediaFileSet()
        listing = Listing()
        file_ids: list[str] = []
        for item in self.items:
            raw = self.vault.archive.read(item)
            entry = fileset.add_header(raw, item.transfer_syntax)
            listing.add(entry.file_id, entry.header)
            file_ids.append(entry.file_id)
            yield entry.file_id, raw
        yield DICOMDIR, fileset.encode(file_ids)
        yield INDEX, index_html(listing, self.request.lang)
        yield README, readme(self.request.lang)


__all__ = ["DICOMDIR", "INDEX", "README", "MediaError", "MediaExport", "Request",
           "select_items"]
