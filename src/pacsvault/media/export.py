"""A media export: select, plan, record the disclosure, then hand out the files one by one.

Shared by ``pacsvault export --media DIR`` (each file written to the folder) and the
physician's ZIP download (each file written into a ZIP streamed to the browser). The order
is the identified export's (``cli/export.py``): everything that can refuse does so first,
then the disclosure is recorded durably (fail closed: no record, no byte), then the files
follow.

The plan comes from the index alone, before any object is decrypted: each instance's
stored header (``instances.meta_json``, sealed) gives its DICOMDIR records and its file ID,
and its stored size is the size of its file. So the DICOMDIR, the listing and every file's
size are known up front: an instance pydicom cannot list refuses the export before it
starts, and the ZIP announces its exact length (the browser shows a real progress bar).
Then each instance is decrypted into memory once and handed out with its stored bytes
unchanged (a size that differs from the index stops the export: the DICOMDIR would lie).
Quarantined instances (hidden by an administrator) stay out: the media holds what the
physicians see.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.dicomfile.dicomjson import json_to_dataset, strip_bulk_item
from pacsvault.index import records
from pacsvault.index.models import Instance, Patient, Study
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
    """The instances of one study (or else of one patient), quarantined ones left out,
    with their stored headers, in retrieval order (one query)."""
    where: list[ColumnElement[bool]] = [Instance.quarantined.is_(None)]
    if study_uid:
        where.append(Study.study_uid == study_uid)
    elif patient_id:
        where.append(Patient.patient_id == patient_id)
    else:
        return []
    return records.load(vault.sessions, records.select_instances(with_header=True)
                        .where(*where))


def _header(item: StoredInstance) -> Dataset:
    meta: dict[str, Any] = json.loads(item.meta_json or "{}")
    return json_to_dataset(strip_bulk_item(meta, keep_empty=False))


class MediaExport:
    """One export, planned and recorded at construction: raises ``MediaError`` (nothing
    to export, an instance that cannot be listed) before the record, ``AuditUnavailable``
    if the trail cannot take it."""

    def __init__(self, vault: Vault, items: list[StoredInstance], request: Request) -> None:
        if not items:
            raise MediaError("nothing matches; no file was written")
        self.vault, self.items, self.request = vault, items, request
        self.studies = len({i.study_uid for i in items})
        self.patients = len({i.patient_id for i in items})
        self.total = sum(i.size for i in items)  # the instances' bytes, for progress
        fileset = MediaFileSet()
        listing = Listing()
        self.file_ids: list[str] = []
        for item in items:
            entry = fileset.add_header(_header(item), item.transfer_syntax)
            listing.add(entry.file_id, entry.header)
            self.file_ids.append(entry.file_id)
        self.extras: list[tuple[str, bytes]] = [
            (DICOMDIR, fileset.encode(self.file_ids)),
            (INDEX, index_html(listing, request.lang)),
            (README, readme(request.lang))]
        self._record()

    def sizes(self) -> list[tuple[str, int]]:
        """(relative path, size) of every file ``files`` hands out, in that order."""
        return ([(f, i.size) for f, i in zip(self.file_ids, self.items, strict=True)]
                + [(name, len(data)) for name, data in self.extras])

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
        for file_id, item in zip(self.file_ids, self.items, strict=True):
            raw = self.vault.archive.read(item)
            if len(raw) != item.size:
                raise MediaError("an instance's size differs from the index; export "
                                 "stopped")
            yield file_id, raw
        yield from self.extras


__all__ = ["DICOMDIR", "INDEX", "README", "MediaError", "MediaExport", "Request",
           "select_items"]
