"""STOW-RS (PS3.18 10.5): store the parts of a multipart/related body through the archive.

Each part goes through ``Archive.store``, the path C-STORE uses: full parse, encryption,
staged durable write, index commit, publication; the duplicate policy is the archive's
(identical bytes: success, nothing written; different bytes under a known SOP Instance
UID: the first one is kept and the part is reported failed, reason 0111 "duplicate SOP
instance", with a security event).

The body is read completely and checked for its closing boundary *before* anything is
stored (``read_request``; a refusal is a ``DicomWebError``): a truncated upload stores
nothing and answers 400. Bodies are held in memory (never in a plaintext temporary file)
and limited to ``MAX_BODY`` bytes (413 beyond): send large studies in several requests.

A part that fails gets as FailureReason the status C-STORE answers for the same failure
(one table, ``dicom/status``).

Answer (PS3.18 10.5.3): 200 all stored, 202 some failed, 409 none stored; the body is the
store response dataset in DICOM JSON (ReferencedSOPSequence with a RetrieveURL per stored
instance, FailedSOPSequence with FailureReason), always as ``application/dicom+json``
(XML answers are not offered). Each part must be ``application/dicom`` (a Part 10 stream
with its file meta information); the file meta is kept as the client wrote it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from starlette.requests import Request

from pacsvault.dicom import status
from pacsvault.dicom.status import store_failure
from pacsvault.dicomfile import parse as dicom_parse
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault
from pacsvault.web import wado
from pacsvault.web.errors import DicomWebError
from pacsvault.web.multipart import (
    BodyTooLarge,
    ClientDisconnect,
    MultipartError,
    Part,
    parse_media_type,
    parse_related,
    read_body,
)

log = logging.getLogger("pacsvault.web.stow")

MAX_BODY = 512 * 1024 * 1024
MAX_PARTS = 10000

# FailureReason values (PS3.18 10.5.3): PS3.4 C-STORE statuses, from the table C-STORE
# uses (``dicom/status``); the names stay importable from here.
PROCESSING_FAILURE = status.PROCESSING_FAILURE
DUPLICATE_SOP = status.STOW_CONFLICT
OUT_OF_RESOURCES = status.OUT_OF_RESOURCES
DOES_NOT_MATCH = status.DOES_NOT_MATCH
CANNOT_UNDERSTAND = status.CANNOT_UNDERSTAND


@dataclass
class Outcome:
    referenced: list[Dataset] = field(default_factory=list)
    failed: list[Dataset] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    stored_sops: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (study, sop)
    counts: dict[str, int] = field(default_factory=lambda: {
        "stored": 0, "duplicate": 0, "conflict": 0, "failed": 0})
    reasons: dict[str, int] = field(default_factory=dict)  # "C000" -> count

    @property
    def status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.referenced else 409


@dataclass(frozen=True)
class _Header:
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str


def _header(raw: bytes) -> _Header | None:
    """The identifying UIDs of a part, read cheaply (the archive parses it fully)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Bounded inflation of deflated parts (issue 11): never pydicom's own.
            ds = dicom_parse.read(raw, stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
            return _Header(*(str(ds.get(k, "") or "").strip() for k in (
                "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")))
    except Exception:
        return None


def _failed(outcome: Outcome, head: _Header | None, reason: int) -> None:
    item = Dataset()
    item.ReferencedSOPClassUID = head.sop_class if head else ""
    item.ReferencedSOPInstanceUID = head.sop_uid if head else ""
    item.FailureReason = reason
    outcome.failed.append(item)
    key = f"{reason:04X}"
    outcome.reasons[key] = outcome.reasons.get(key, 0) + 1
    outcome.counts["conflict" if reason == DUPLICATE_SOP else "failed"] += 1


def _part_type_ok(part: Part) -> bool:
    content_type = part.content_type.split(";", 1)[0].strip().lower()
    return content_type in ("", "application/dicom")


async def read_request(request: Request, study: str | None) -> tuple[list[Part], bytearray]:
    """The parts of a STOW-RS request, read whole and checked before anything is stored;
    a refusal is a ``DicomWebError`` (nothing stored)."""
    if study is not None:
        wado.check_uid(study)  # a DicomWebError (400) when it is not a UID
    mime, params = parse_media_type(request.headers.get("content-type", ""))
    part_type = params.get("type", "application/dicom").strip().lower()
    if mime != "multipart/related" or part_type != "application/dicom":
        raise DicomWebError(
            415, 'STOW-RS takes multipart/related; type="application/dicom"')
    try:
        body = await read_body(request, MAX_BODY)
        parts = parse_related(body, params.get("boundary", ""))
    except BodyTooLarge:
        raise DicomWebError(
            413, f"request body above {MAX_BODY} bytes; nothing stored "
                 "(send the instances in several requests)") from None
    except ClientDisconnect:
        raise DicomWebError(400, "the upload was interrupted; nothing stored") from None
    except MultipartError as exc:
        raise DicomWebError(400, f"{exc}; nothing stored") from None
    if not parts:
        raise DicomWebError(400, "no instance in the request")
    if len(parts) > MAX_PARTS:
        raise DicomWebError(413, "too many parts in one request; nothing stored")
    return parts, body


def store_parts(vault: Vault, parts: list[Part], study: str | None, base: str, *,
                user: str = "", address: str = "") -> Outcome:
    """Store every part (blocking: call from a worker thread). ``user`` and ``address``
    name the actor in the store records written with each commit."""
    outcome = Outcome()
    for part in parts:
        raw = bytes(part.content)
        if not _part_type_ok(part):
            _failed(outcome, None, CANNOT_UNDERSTAND)
            continue
        head = _header(raw)
        if study is not None and head is not None and head.study_uid != study:
            _failed(outcome, head, DOES_NOT_MATCH)
            continue
        try:
            result = vault.archive.store(raw, source_ae="", actor_user=user,
                                         actor_address=address)
        except Exception as exc:
            # The same status C-STORE answers for the same failure (``dicom/status``).
            _failed(outcome, head, store_failure(exc, log).status)
            continue
        if result.status is StoreStatus.CONFLICT:
            outcome.conflicts.append((result.study_uid, result.sop_uid))
            _failed(outcome, head, DUPLICATE_SOP)
            continue
        outcome.counts[result.status.value] += 1
        outcome.studies.add(result.study_uid)
        outcome.stored_sops.append(result.sop_uid)
        item = Dataset()
        item.ReferencedSOPClassUID = head.sop_class if head else ""
        item.ReferencedSOPInstanceUID = result.sop_uid
        if head is not None:
            item.RetrieveURL = (f"{base}/studies/{result.study_uid}/series/{head.series_uid}"
                                f"/instances/{result.sop_uid}")
        outcome.referenced.append(item)
    return outcome


def response(outcome: Outcome, study: str | None, base: str) -> dict[str, Any]:
    ds = Dataset()
    studies = sorted(outcome.studies) if study is None else [study]
    if len(studies) == 1:
        ds.RetrieveURL = f"{base}/studies/{studies[0]}"
    if outcome.referenced:
        ds.ReferencedSOPSequence = outcome.referenced
    if outcome.failed:
        ds.FailedSOPSequence = outcome.failed
    result: dict[str, Any] = ds.to_json_dict()
    return result
