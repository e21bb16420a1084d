"""The scrubber and the orphan sweep: is every indexed object there, and readable?

Why: a bucket is run by someone else (an IT provider, a cloud). An object deleted or
damaged there is found at the next scrub, not the day a doctor opens the study.

- ``scrub`` reads every indexed object (quarantined ones too) through the object store,
  decrypts it with its data key and authenticates it against its SOP Instance UID
  (``crypto.objects``): missing (``FileNotFoundError``) and corrupt (authentication fails)
  objects are listed by object id (random: safe to print), at most ``per_second``
  objects per second. Objects whose data key was destroyed (an erasure finishing) are
  skipped. The index is read in pages by primary key, never in one long transaction.
- ``sweep``: the S3 store's orphan sweep (``S3Store.sweep``: objects no row names, older
  than the grace) with the index's answer.
- ``serve`` runs both as background jobs (``service.jobs``) when the objects are in a
  bucket: ``sweep_tick`` every ``orphan_sweep_seconds``, and ``tick`` a bounded slice of
  the scrub each minute so that a full pass takes about ``scrub_every_hours`` at most
  ``scrub_per_second``; each finished pass (and each missing or corrupt object at once)
  is recorded: ``storage.scrub`` (outcome serious failure when anything is wrong, with
  the instances as sealed references), which the alert rules see as a failure.
  ``pacsvault storage scrub`` runs a whole pass now, for local files as well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.crypto import objects as objfmt
from pacsvault.crypto.keyring import KeyDestroyed
from pacsvault.index.models import Instance
from pacsvault.storage.objects import ObjectBackend
from pacsvault.storage.s3 import Sweep

if TYPE_CHECKING:
    import uuid

    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.storage")

_PAGE = 200


@dataclass(frozen=True)
class Row:
    pk: int
    object_id: str
    key_id: str
    sop_uid: str


@dataclass
class ScrubReport:
    checked: int = 0
    skipped: int = 0  # data key destroyed: the rows are going
    missing: list[str] = field(default_factory=list)  # object ids
    corrupt: list[str] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)  # of the bad ones (sealed refs only)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def rows(sessions: sessionmaker[Session], after: int = 0,
         limit: int | None = None) -> Iterator[Row]:
    """Indexed instances from primary key ``after`` on, one short read per page."""
    seen = 0
    while limit is None or seen < limit:
        page = _PAGE if limit is None else min(_PAGE, limit - seen)
        with sessions() as session:
            found = session.execute(
                select(Instance.pk, Instance.object_id, Instance.key_id, Instance.sop_uid)
                .where(Instance.pk > after).order_by(Instance.pk).limit(page)).all()
        if not found:
            return
        for pk, object_id, key_id, sop_uid in found:
            yield Row(int(pk), str(object_id), str(key_id), str(sop_uid))
        seen += len(found)
        after = int(found[-1][0])


def check(row: Row, objects: ObjectBackend, data_key: Callable[[uuid.UUID], bytes],
          report: ScrubReport) -> None:
    """Read, decrypt and authenticate one indexed object into ``report``."""
    import uuid

    try:
        key = data_key(uuid.UUID(row.key_id))
    except KeyDestroyed:
        report.skipped += 1
        return
    report.checked += 1
    try:
        blob = objects.read(row.object_id)
    except FileNotFoundError:
        report.missing.append(row.object_id)
        report.sop_uids.append(row.sop_uid)
        return
    try:
        objfmt.decrypt(blob, key, row.sop_uid)
    except objfmt.ObjectFormatError:
        report.corrupt.append(row.object_id)
        report.sop_uids.append(row.sop_uid)


def scrub(vault: Vault, *, per_second: float | None = None,
          stop: threading.Event | None = None) -> ScrubReport:
    """One whole pass now (``pacsvault storage scrub``)."""
    report = ScrubReport()
    archive = vault.archive
    pause = 1.0 / per_second if per_second else 0.0
    for row in rows(vault.sessions):
        if stop is not None and stop.is_set():
            break
        started = time.monotonic()
        check(row, vault.store, archive.data_key, report)
        if pause:
            time.sleep(max(0.0, pause - (time.monotonic() - started)))
    return report


def record(vault: Vault, report: ScrubReport, *, via: str, complete: bool = True) -> None:
    """The ``storage.scrub`` audit record (counts; the bad instances as sealed refs), and
    the counts in ``scrub_state`` for the status report. ``complete``: a whole pass."""
    from pacsvault.audit import AuditEvent, EventCode, Outcome
    from pacsvault.storage import scrub_state

    scrub_state.note_scrub(vault.layout.root, report, via=via, complete=complete)

    bad = len(report.missing) + len(report.corrupt)
    vault.recorder.emit(AuditEvent(
        action="storage.scrub",
        outcome=Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE,
        code=EventCode.APPLICATION_ACTIVITY,
        message=(f"Object scrub: {report.checked} object(s) read and authenticated"
                 + (f"; {len(report.missing)} missing and {len(report.corrupt)} corrupt "
                    "(restore them from a backup; 'pacsvault storage scrub' lists their "
                    "object ids)" if bad else "; all present and intact")),
        sop_uids=tuple(report.sop_uids[:100]),
        detail={"checked": report.checked, "skipped": report.skipped,
                "missing": len(report.missing), "corrupt": len(report.corrupt),
                "missing_ids": " ".join(report.missing[:20]),
                "corrupt_ids": " ".join(report.corrupt[:20]),
                "via": via},
    ))
    if bad:
        log.error("object scrub: %d missing, %d corrupt object(s)", len(report.missing),
                  len(report.corrupt))


def sweep(vault: Vault, *, grace: float | None = None) -> Sweep | None:
    """The orphan sweep of a bucket, recorded when it removed or refused anything (None
    for local files: their recovery runs at start)."""
    from pacsvault.audit import AuditEvent, EventCode, Outcome
    from pacsvault.storage.s3 import S3Store

    store = vault.store
    if not isinstance(store, S3Store):
        return None
    done = store.sweep(vault.archive.indexed, grace=grace)
    from pacsvault.storage import scrub_state

    scrub_state.note_sweep(vault.layout.root, done)
    if done.refused:
        vault.recorder.emit(AuditEvent(
            action="storage.orphans", outcome=Outcome.SERIOUS_FAILURE,
            code=EventCode.APPLICATION_ACTIVITY,
            message=(f"{done.refused} objects of the bucket are named by no index row "
                     f"(more than orphan_limit = {store.orphan_limit}): nothing was deleted. "
                     "Is this vault's index the one that goes with this bucket and prefix "
                     "(restored from an older backup?)"),
            detail={"removed": 0, "refused": done.refused, "listed": done.listed},
        ))
    elif done.removed:
        vault.recorder.emit(AuditEvent(
            action="storage.orphans", outcome=Outcome.SUCCESS,
            code=EventCode.APPLICATION_ACTIVITY,
            message=(f"{len(done.removed)} object(s) stored but never indexed (a crash or a "
                     "failed store between the upload and the index) were deleted from the "
                     "bucket after the grace period"),
            detail={"removed": len(done.removed), "listed": done.listed},
        ))
    return done


# --- serve's jobs ---------------------------------------------------------------------------


@dataclass
class _Pass:
    """One scrub pass in progress in ``serve``, advanced a slice per tick."""

    after: int = 0
    started: float = field(default_factory=time.monotonic)
    report: ScrubReport = field(default_factory=ScrubReport)
    next_pass: float = 0.0
    next_sweep: float = 0.0


_PASSES: dict[str, _Pass] = {}
_TICK_SECONDS = 60.0  # (``service.jobs``: the scrub job's period)


def tick(vault: Vault) -> None:
    """Scrub a slice: at most ``scrub_per_second`` x one tick's seconds of objects, within
    a tick's time. A pass ends when the index has no row left; the next one starts
    ``scrub_every_hours`` after this one started."""
    settings = vault.settings.storage
    if not settings.url:
        return  # local files: their recovery at start; 'storage scrub' on demand
    state = _PASSES.setdefault(vault.vault_id, _Pass())
    now = time.monotonic()
    if now < state.next_pass:
        return
    budget = max(1, int(settings.scrub_per_second * _TICK_SECONDS / 2))
    pause = 1.0 / settings.scrub_per_second
    report = state.report
    missing_before, corrupt_before = len(report.missing), len(report.corrupt)
    last = state.after
    done = 0
    for row in rows(vault.sessions, state.after, budget):
        started = time.monotonic()
        check(row, vault.store, vault.archive.data_key, report)
        last = row.pk
        done += 1
        time.sleep(max(0.0, pause - (time.monotonic() - started)))
    state.after = last
    if len(report.missing) > missing_before or len(report.corrupt) > corrupt_before:
        # recorded at once, not at the end of a day-long pass
        record(vault, ScrubReport(
            checked=report.checked, missing=report.missing[missing_before:],
            corrupt=report.corrupt[corrupt_before:],
            sop_uids=report.sop_uids[missing_before + corrupt_before:]), via="serve",
            complete=False)
    if done < budget:  # the end of the index: the pass is over
        record(vault, report, via="serve")
        _PASSES[vault.vault_id] = _Pass(
            next_pass=state.started + settings.scrub_every_hours * 3600,
            next_sweep=state.next_sweep)


def sweep_tick(vault: Vault) -> None:
    """The orphan sweep, every ``orphan_sweep_seconds`` (bucket only)."""
    settings = vault.settings.storage
    if not settings.url:
        return
    state = _PASSES.setdefault(vault.vault_id, _Pass())
    now = time.monotonic()
    if now < state.next_sweep:
        return
    state.next_sweep = now + settings.orphan_sweep_seconds
    sweep(vault)
