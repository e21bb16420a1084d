"""Merging the sealed journals once the master key is back (``pacsvault unseal``, the
``/unseal`` page, or a normal start that finds journals left by a sealed run).

Per session, oldest first: the events go into the trail in their order (their own times;
the trail never lets time go back), then the events file is deleted; then each stored
object's data key is opened with the HPKE private key (a named secret under the master
key) and its rows are committed by ``Archive.adopt`` (the archive's normal group commit,
with its store record), the data key re-wrapped as an ordinary algorithm-1 key; then the
stores file is deleted. Redone after a crash, nothing is indexed twice (``adopt`` knows an
object it indexed already) and no event is appended twice (its file went once merged).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.crypto import datakeys
from pacsvault.sealed import journal, material

if TYPE_CHECKING:
    from pacsvault.dicomfile.parse import ParsedInstance
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.sealed")

_ATTEMPTS = 3


# --- (de)serialising what the journals hold ------------------------------------------------


def event_record(event: AuditEvent) -> dict[str, Any]:
    return {
        "action": event.action, "outcome": event.outcome.value, "code": event.code.value,
        "message": event.message, "ae": event.actor_ae, "address": event.actor_address,
        "user": event.actor_user, "study_uids": list(event.study_uids),
        "sop_uids": list(event.sop_uids), "patient_ids": list(event.patient_ids),
        "detail": dict(event.detail), "time": event.time.isoformat(),
        "study_patients": dict(event.study_patients), "sop_studies": dict(event.sop_studies),
    }


def event_from_record(value: Mapping[str, Any]) -> AuditEvent:
    return AuditEvent(
        action=str(value["action"]), outcome=Outcome(value["outcome"]),
        code=EventCode(value["code"]), message=str(value.get("message", "")),
        actor_ae=str(value.get("ae", "")), actor_address=str(value.get("address", "")),
        actor_user=str(value.get("user", "")),
        study_uids=tuple(value.get("study_uids", ())), sop_uids=tuple(value.get("sop_uids", ())),
        patient_ids=tuple(value.get("patient_ids", ())), detail=dict(value.get("detail", {})),
        time=dt.datetime.fromisoformat(str(value["time"])),
        study_patients=dict(value.get("study_patients", {})),
        sop_studies=dict(value.get("sop_studies", {})),
    )


def parsed_record(parsed: ParsedInstance) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in fields(parsed):
        value = getattr(parsed, item.name)
        out[item.name] = value.hex() if isinstance(value, bytes) else value
    return out


def parsed_from_record(value: Mapping[str, Any]) -> ParsedInstance:
    from pacsvault.dicomfile.parse import ParsedInstance

    kwargs = {item.name: value[item.name] for item in fields(ParsedInstance)}
    kwargs["sha256"] = bytes.fromhex(str(kwargs["sha256"]))
    return ParsedInstance(**kwargs)


# --- merging ------------------------------------------------------------------------------


@dataclass
class MergeReport:
    sessions: int = 0
    events: int = 0
    stored: int = 0
    duplicates: int = 0  # identical or re-encoded: the first kept, nothing new
    conflicts: int = 0
    failed: int = 0
    damaged: int = 0  # journal records that did not open (reported, skipped)
    keys: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"sessions": self.sessions, "events": self.events, "stored": self.stored,
                "duplicates": self.duplicates, "conflicts": self.conflicts,
                "failed": self.failed, "damaged": self.damaged,
                "data_keys": len(self.keys)}


def journal_dir(root: Path) -> Path:
    return journal.journal_dir(material.sealed_dir(root))


def pending(root: Path) -> bool:
    return journal.pending(journal_dir(root))


def _damaged(vault: Vault, report: MergeReport, session: str,
             kind: str) -> Callable[[int], None]:
    """A record that does not open: counted, and a security event once the trail takes
    events again (the sink may be switching now: collected, emitted by ``record_merge``)."""

    def note(seq: int) -> None:
        report.damaged += 1
        report.problems.append(f"{session}.{kind} record {seq}")
        log.error("sealed journal %s.%s: record %d does not open (damaged or tampered "
                  "with); skipped", session, kind, seq)

    return note


def merge_events(vault: Vault, report: MergeReport,
                 append: Callable[[AuditEvent], object] | None = None) -> None:
    """Every session's events into the trail, in order; each events file deleted once in."""
    private = material.hpke_private(vault)
    directory = journal_dir(vault.layout.root)
    write = append or vault.audit.append
    for session in journal.sessions(directory):
        for value in journal.read(directory, session, journal.EVENTS, private,
                                  _damaged(vault, report, session, journal.EVENTS)):
            write(event_from_record(value))
            report.events += 1
        path = directory / f"{session}.{journal.EVENTS}"
        if path.exists():
            path.unlink()


def merge_stores(vault: Vault, report: MergeReport, *, skip: frozenset[str] = frozenset(),
                 only: frozenset[str] | None = None) -> None:
    """Every session's stored objects into the index (see the module docstring); ``skip``
    and ``only`` choose sessions (the unseal merges the live one last, stores paused)."""
    from pacsvault.storage.archive import StaleChoice, StoreStatus

    private = material.hpke_private(vault)
    directory = journal_dir(vault.layout.root)
    archive = vault.archive
    opened: dict[str, bytes] = {}
    for session in journal.sessions(directory):
        if session in skip or (only is not None and session not in only):
            continue
        report.sessions += 1
        for value in journal.read(directory, session, journal.STORES, private,
                                  _damaged(vault, report, session, journal.STORES)):
            key_id = uuid.UUID(str(value["key_id"]))
            data_key = opened.get(str(key_id))
            if data_key is None:
                data_key = datakeys.unwrap_sealed(private, key_id,
                                                  base64.b64decode(value["wrapped"]))
                opened[str(key_id)] = data_key
            parsed = parsed_from_record(value["parsed"])
            for attempt in range(_ATTEMPTS):
                try:
                    result = archive.adopt(parsed, str(value["object_id"]), key_id, data_key,
                                           source_ae=str(value.get("source_ae", "")),
                                           actor_address=str(value.get("address", "")),
                                           actor_user=str(value.get("user", "")))
                    break
                except StaleChoice:
                    if attempt == _ATTEMPTS - 1:
                        raise
            if result.status is StoreStatus.STORED:
                report.stored += 1
                report.keys.add(str(key_id))
            elif result.status is StoreStatus.DUPLICATE:
                report.duplicates += 1
            else:
                report.conflicts += 1
                vault.recorder.emit(AuditEvent(
                    action="sealed.store.conflict", outcome=Outcome.MINOR_FAILURE,
                    code=EventCode.SECURITY_ALERT, actor_ae=str(value.get("source_ae", "")),
                    actor_address=str(value.get("address", "")),
                    message="an object received while sealed has the SOP Instance UID of a "
                    "different stored object; the first one was kept",
                    study_uids=(result.study_uid,), sop_uids=(result.sop_uid,),
                ), required=False)
        journal.remove(directory, session)


def merge_all(vault: Vault) -> MergeReport:
    """Events, then stores; used when a normal start finds journals (no sealed sink)."""
    report = MergeReport()
    merge_events(vault, report)
    merge_stores(vault, report)
    record_merge(vault, report)
    return report


def record_merge(vault: Vault, report: MergeReport, *, actor_user: str = "",
                 actor_address: str = "") -> None:
    if report.problems:
        vault.recorder.emit(AuditEvent(
            action="sealed.journal.damaged", outcome=Outcome.MAJOR_FAILURE,
            code=EventCode.SECURITY_ALERT, actor_user=actor_user, actor_address=actor_address,
            message="sealed journal records did not open with this vault's key (damaged or "
            "tampered with) and were skipped: the images they named are not indexed; keep "
            "DATA/objects as evidence",
            detail={"records": len(report.problems),
                    "first": report.problems[0][:120]},
        ), required=False)
    vault.recorder.emit(AuditEvent(
        action="sealed.merged", outcome=Outcome.SUCCESS, code=EventCode.APPLICATION_ACTIVITY,
        actor_user=actor_user, actor_address=actor_address,
        message="the sealed journals were merged into the index and the trail",
        detail=dict(report.as_dict()),
    ), required=False)
