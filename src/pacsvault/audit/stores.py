"""Store records written with the group commit: an acknowledged image always has its record.

Why: recording stores once per association (at its end) left every image acknowledged
before a crash or an OOM kill without any record naming it. The archive now writes one
record per committed batch and per actor (node or user, address), naming the batch's
instances, studies and patients (sealed), *inside* the index transaction that commits
their rows: the record is durable before ``store`` returns, so before any success status
is sent; if it cannot be written the transaction rolls back and the store is refused.
One record (one fsync) per batch keeps the cost per image low under load.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection

from pacsvault.audit.events import AuditEvent, AuditUnavailable, EventCode, Outcome, Recorder
from pacsvault.audit.trail import AuditTrail, BatchWriter


@dataclass(frozen=True)
class StoredRef:
    """One instance of a batch, as the store record names it."""

    sop_uid: str
    study_uid: str
    patient_id: str
    source_ae: str
    address: str
    user: str
    duplicate: bool = False


def batch_events(items: Sequence[StoredRef]) -> list[AuditEvent]:
    """One event per actor (a batch may hold several associations' images)."""
    groups: dict[tuple[str, str, str], list[StoredRef]] = {}
    for item in items:
        groups.setdefault((item.source_ae, item.address, item.user), []).append(item)
    events = []
    for (ae, address, user), refs in groups.items():
        channel = "dicom" if ae else "dicomweb"
        duplicates = sum(1 for r in refs if r.duplicate)
        events.append(AuditEvent(
            action=f"{channel}.store.committed", outcome=Outcome.SUCCESS,
            code=EventCode.IMPORT, actor_ae=ae, actor_address=address, actor_user=user,
            detail={"instances": len(refs), "new": len(refs) - duplicates,
                    "duplicates": duplicates},
            sop_uids=tuple(r.sop_uid for r in refs),
            study_uids=tuple(sorted({r.study_uid for r in refs})),
            patient_ids=tuple(sorted({r.patient_id for r in refs})),
            study_patients={r.study_uid: r.patient_id for r in refs},
            sop_studies={r.sop_uid: r.study_uid for r in refs},
        ))
    return events


class StoreJournal:
    """What the archive calls around its commit (see ``Archive._index_batch``)."""

    def __init__(self, trail: AuditTrail, recorder: Recorder) -> None:
        self._trail = trail
        self._recorder = recorder

    @property
    def recorder(self) -> Recorder:
        """Where the archive sends its other store events (a re-encoded duplicate)."""
        return self._recorder

    @contextmanager
    def batch(self) -> Iterator[JournalBatch]:
        """Hold the trail (taken before the index's write lock, like every appender)."""
        try:
            with self._trail.batch() as writer:
                batch = JournalBatch(writer, self._recorder)
                yield batch
        except AuditUnavailable:
            raise
        except OSError as exc:  # the trail lock file itself is unusable
            raise AuditUnavailable(str(exc)) from exc
        for event in batch.written:
            self._recorder.publish(event)  # log, syslog, alerts: already durable here


class JournalBatch:
    def __init__(self, writer: BatchWriter, recorder: Recorder) -> None:
        self._writer = writer
        self._recorder = recorder
        self.written: list[AuditEvent] = []

    def write(self, conn: Connection, items: Sequence[StoredRef]) -> None:
        """Durable before returning, or ``AuditUnavailable`` (the caller rolls back)."""
        events = batch_events(items)
        if not events:
            return
        try:
            self._writer.write(conn, events)
        except Exception as exc:
            self._recorder.durable_failed(events[0], exc)
            raise AuditUnavailable(str(exc)) from exc
        self.written.extend(events)
