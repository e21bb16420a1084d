"""Removing a bad object: delete (with crypto-shredding) and quarantine, for admins.

Why here and not in the archive: the archive only ever adds; this is the one place that
takes rows away, and it must stay correct while a server runs in another process (the
command line) or in this one (the admin page).

**Delete** (a study, a series or an instance), in one write transaction taken with
``BEGIN IMMEDIATE`` (the write lock first, so what is counted is what is deleted):

1. an ``object_actions`` row: who, when, what, the admin's reason (free text, kept in the
   encrypted index and never in logs), and the object files still to delete (``pending``).
   Its id raises the index's *removal generation*;
2. the instance rows, then every series, study and patient row left without instances;
   the counts, modalities and stored headers (``meta_json``) of the rows that remain are
   recomputed from their remaining visible instances (the stored header of a study is its
   first instance's: if that was the bad object, the study must stop answering with it);
3. **crypto-shredding**: a patient left without any instance loses their row and their
   wrapped data key (``data_keys.wrapped = NULL``, ``destroyed`` set): every copy of their
   objects, backups included, is unreadable from then on.

After the commit: the audit event (``object.deleted``, PS3.15 "DICOM Instances Accessed"
with action code D, references sealed), then the ciphertext files are unlinked (staged
places first, then the published one: a publication racing the delete moves the file to
where the second unlink finds it) and their directories fsync'ed; ``pending`` is cleared.
A crash in between leaves ``pending`` set: the next removal, or the admin page, finishes
it (``finish_pending``); the index never names a file that is gone.

**Server caches.** A running server caches study UID → (row, data key id), series UID →
row and unwrapped data keys (``storage.archive``). Its every commit batch reads the removal
generation inside its write transaction: on a change it drops those caches, and a store
whose study/key choice was made before the removal is redone from scratch. So a deleted
study is never resurrected by a stale cache, nor an object encrypted under a destroyed
key indexed: the command line may delete while the server runs.

**Quarantine** (an instance): ``instances.quarantined`` is set. The instance stays (export
and delete still work) but the query engine hides it from C-FIND, QIDO-RS, WADO-RS, C-MOVE
and C-GET (``index.query``); counts and stored headers of its series, study and patient are
recomputed without it (a study whose every instance is quarantined is hidden too). The
identical object sent again stays in quarantine (a duplicate of a known instance).
"""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.index import dialect
from pacsvault.index.levels import Level
from pacsvault.index.models import (
    DataKey,
    Instance,
    ObjectAction,
    Patient,
    Series,
    Study,
    utcnow,
)
from pacsvault.storage.archive import Archive
from pacsvault.storage.objects import ObjectBackend

# An admin removes a study, series or instance (DICOMweb names of ``Level``).
LEVELS = tuple(level.web_name for level in Level if level is not Level.PATIENT)
MAX_REASON = 1000
_CHUNK = 500

_instances: Table = Instance.__table__  # type: ignore[assignment]
_series: Table = Series.__table__  # type: ignore[assignment]
_studies: Table = Study.__table__  # type: ignore[assignment]
_patients: Table = Patient.__table__  # type: ignore[assignment]
_keys: Table = DataKey.__table__  # type: ignore[assignment]
_actions: Table = ObjectAction.__table__  # type: ignore[assignment]


class RemovalError(Exception):
    """A removal that cannot be done (message is user-facing, without patient data)."""


class NotFound(RemovalError):
    pass


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise RemovalError("the level is study, series or instance")
    return level


def check_uid(uid: str) -> str:
    """Any UID an object could have been stored under (even a malformed one: it is what
    the admin must be able to remove), but nothing that is not one."""
    uid = uid.strip()
    if not uid or len(uid) > 64 or any(not c.isprintable() for c in uid):
        raise RemovalError("a UID is 1 to 64 printable characters")
    return uid


def check_reason(reason: str) -> str:
    """Required, recorded: one line of printable text."""
    reason = " ".join(reason.split())
    if not reason:
        raise RemovalError("a reason is required (it is recorded with the removal)")
    if len(reason) > MAX_REASON:
        raise RemovalError(f"the reason has at most {MAX_REASON} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in reason):
        raise RemovalError("the reason must be plain text")
    return reason


@dataclass(frozen=True)
class Plan:
    """What a removal touches. UIDs and patient IDs are for the sealed audit references
    and the admin's screen only, never for logs."""

    level: str
    uid: str
    sop_uids: tuple[str, ...]
    series_uids: tuple[str, ...]
    study_uids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    object_ids: tuple[str, ...]
    quarantined: int  # how many of the instances are in quarantine
    size: int
    modalities: tuple[str, ...]
    series_removed: int  # rows left empty, deleted with the instances
    studies_removed: int
    patients_removed: int
    keys_destroyed: tuple[str, ...]  # data key ids crypto-shredded
    # which patient each study, which study each instance belongs to: the trail groups
    # the sealed references per patient with them (the rows are gone once deleted)
    study_patients: tuple[tuple[str, str], ...] = ()
    sop_studies: tuple[tuple[str, str], ...] = ()

    @property
    def instances(self) -> int:
        return len(self.sop_uids)


@dataclass(frozen=True)
class Done:
    action_id: int
    plan: Plan
    files_deleted: int


@dataclass(frozen=True)
class QuarantineChange:
    action_id: int
    sop_uid: str
    study_uid: str
    patient_id: str


@dataclass(frozen=True)
class Quarantined:
    sop_uid: str
    series_uid: str
    study_uid: str
    modality: str
    since: dt.datetime | None
    reason: str
    actor: str


@dataclass(frozen=True)
class ActionRecord:
    id: int
    time: dt.datetime | None
    action: str
    level: str
    uid: str
    reason: str
    actor: str
    instances: int
    keys_destroyed: int


class Remover:
    """Delete and quarantine, for the command line and the admin page alike.

    ``archive`` is this process's archive when the server runs in it (the admin page):
    its caches are dropped at once instead of at its next commit.
    """

    def __init__(self, engine: Engine, objects: ObjectBackend, recorder: Recorder,
                 archive: Archive | None = None) -> None:
        self._engine = engine
        self._sessions: sessionmaker[Session] = sessionmaker(engine)
        self.objects = objects
        self._recorder = recorder
        self._archive = archive

    # --- looking ----------------------------------------------------------------------

    def plan(self, level: str, uid: str) -> Plan:
        """What deleting ``level`` ``uid`` would remove (NotFound if nothing)."""
        level, uid = check_level(level), check_uid(uid)
        with self._engine.connect() as conn:
            return _plan(conn, level, uid)

    def quarantined(self, limit: int = 500) -> list[Quarantined]:
        """Instances in quarantine, most recent first, with the reason recorded."""
        stmt = (
            select(Instance.sop_uid, Series.series_uid, Study.study_uid, Series.modality,
                   Instance.quarantined)
            .join(Series, Instance.series_pk == Series.pk)
            .join(Study, Series.study_pk == Study.pk)
            .where(Instance.quarantined.is_not(None))
            .order_by(Instance.quarantined.desc()).limit(limit)
        )
        found: list[Quarantined] = []
        with self._sessions() as session:
            for sop, series, study, modality, since in session.execute(stmt):
                last = session.execute(
                    select(ObjectAction.reason, ObjectAction.actor)
                    .where(ObjectAction.action == "quarantine", ObjectAction.uid == sop)
                    .order_by(ObjectAction.id.desc()).limit(1)).first()
                found.append(Quarantined(sop, series, study, modality or "", since,
                                         last[0] if last else "", last[1] if last else ""))
        return found

    def recent(self, limit: int = 20) -> list[ActionRecord]:
        with self._sessions() as session:
            rows = session.scalars(
                select(ObjectAction).order_by(ObjectAction.id.desc()).limit(limit)).all()
            return [ActionRecord(r.id, r.time, r.action, r.level, r.uid, r.reason, r.actor,
                                 r.instances, r.keys_destroyed) for r in rows]

    # --- deleting ---------------------------------------------------------------------

    def delete(self, level: str, uid: str, reason: str, *, actor: str, address: str = "",
               via: str = "cli", expected: Plan | None = None) -> Done:
        """Delete a study, series or instance for good (see the module docstring).

        ``expected``: the plan the admin confirmed; if the object changed since (more
        instances arrived), nothing is deleted and ``RemovalError`` says so.
        """
        level, uid, reason = check_level(level), check_uid(uid), check_reason(reason)
        self.finish_pending()
        with self._engine.begin() as conn:
            dialect.take_write_lock(conn)  # SQLite: BEGIN IMMEDIATE
            plan = _plan(conn, level, uid)
            if expected is not None and (set(expected.sop_uids) != set(plan.sop_uids)
                                         or expected.keys_destroyed != plan.keys_destroyed):
                raise RemovalError("the object changed since it was shown; nothing was "
                                   "deleted: look at it again")
            action_id = _record(conn, "delete", level, uid, reason, actor, address,
                                len(plan.sop_uids), len(plan.keys_destroyed),
                                pending=list(plan.object_ids))
            _delete_rows(conn, plan)
        if self._archive is not None:
            self._archive.forget()
        try:
            self._emit_deleted(plan, action_id, actor, address, via)
        finally:
            # done in the index: the ciphertext goes even if the trail refused the event
            # (the ``object_actions`` row says who, when and why; the error is raised on)
            deleted = self._delete_files(action_id, plan.object_ids)
        return Done(action_id, plan, deleted)

    def _emit_deleted(self, plan: Plan, action_id: int, actor: str, address: str,
                      via: str) -> None:
        level = plan.level
        self._recorder.emit(AuditEvent(
            action="object.deleted", outcome=Outcome.SUCCESS,
            code=EventCode.INSTANCES_ACCESSED, actor_user=actor, actor_address=address,
            message=(f"An administrator deleted a {level} ({plan.instances} instance(s)); "
                     f"the reason is kept with removal record {action_id}."
                     + (" The patient's data key was destroyed (crypto-shredding)."
                        if plan.keys_destroyed else "")),
            study_uids=plan.study_uids, sop_uids=plan.sop_uids, patient_ids=plan.patient_ids,
            study_patients=dict(plan.study_patients), sop_studies=dict(plan.sop_studies),
            detail={"level": level, "instances": plan.instances,
                    "series_removed": plan.series_removed,
                    "studies_removed": plan.studies_removed,
                    "keys_destroyed": len(plan.keys_destroyed), "record": action_id,
                    "via": via},
        ))

    def finish_pending(self) -> int:
        """Delete the files of removals a crash interrupted after their commit."""
        with self._sessions() as session:
            rows = session.execute(select(ObjectAction.id, ObjectAction.pending)
                                   .where(ObjectAction.pending != "")).all()
        done = 0
        for action_id, pending in rows:
            try:
                ids = [str(i) for i in json.loads(pending)]
            except ValueError:
                ids = []
            done += self._delete_files(int(action_id), ids)
        return done

    def _delete_files(self, action_id: int, object_ids: Sequence[str]) -> int:
        # staged places first, then the published one (``ObjectBackend.remove``): a
        # publication racing us moves the file to where the last unlink finds it. An
        # object store that cannot be reached raises: ``pending`` stays, retried later.
        deleted = self.objects.remove(object_ids)
        with self._engine.begin() as conn:
            conn.execute(update(_actions).where(_actions.c.id == action_id)
                         .values(pending=""))
        return deleted

    # --- quarantine -------------------------------------------------------------------

    def quarantine(self, sop_uid: str, reason: str, *, actor: str, address: str = "",
                   via: str = "cli") -> QuarantineChange:
        return self._set_quarantine(sop_uid, reason, True, actor, address, via)

    def release(self, sop_uid: str, reason: str, *, actor: str, address: str = "",
                via: str = "cli") -> QuarantineChange:
        return self._set_quarantine(sop_uid, reason, False, actor, address, via)

    def _set_quarantine(self, sop_uid: str, reason: str, hide: bool, actor: str,
                        address: str, via: str) -> QuarantineChange:
        sop_uid, reason = check_uid(sop_uid), check_reason(reason)
        with self._engine.begin() as conn:
            dialect.take_write_lock(conn)  # SQLite: BEGIN IMMEDIATE
            row = conn.execute(
                select(_instances.c.pk, _instances.c.quarantined, _series.c.pk,
                       _studies.c.pk, _studies.c.study_uid, _patients.c.pk,
                       _patients.c.patient_id)
                .join(_series, _instances.c.series_pk == _series.c.pk)
                .join(_studies, _series.c.study_pk == _studies.c.pk)
                .join(_patients, _studies.c.patient_pk == _patients.c.pk)
                .where(_instances.c.sop_uid == sop_uid)).first()
            if row is None:
                raise NotFound("no such instance")
            if (row[1] is not None) == hide:
                raise RemovalError("the instance is already in quarantine" if hide
                                   else "the instance is not in quarantine")
            action_id = _record(conn, "quarantine" if hide else "release", "instance",
                                sop_uid, reason, actor, address, 1, 0)
            conn.execute(update(_instances).where(_instances.c.pk == row[0])
                         .values(quarantined=utcnow() if hide else None))
            _refresh(conn, {int(row[2])}, {int(row[3])}, {int(row[5])})
        if self._archive is not None:
            self._archive.forget()
        action = "object.quarantined" if hide else "object.released"
        self._recorder.emit(AuditEvent(
            action=action, outcome=Outcome.SUCCESS, code=EventCode.INSTANCES_ACCESSED,
            actor_user=actor, actor_address=address,
            message=("An administrator put an instance in quarantine (hidden from queries "
                     "and retrieval, kept)" if hide else
                     "An administrator released an instance from quarantine")
            + f"; the reason is kept with removal record {action_id}.",
            study_uids=(str(row[4]),), sop_uids=(sop_uid,), patient_ids=(str(row[6]),),
            study_patients={str(row[4]): str(row[6])}, sop_studies={sop_uid: str(row[4])},
            detail={"level": "instance", "instances": 1, "record": action_id, "via": via},
        ))
        return QuarantineChange(action_id, sop_uid, str(row[4]), str(row[6]))


# --- the SQL ----------------------------------------------------------------------------


def _column(level: str) -> Any:
    return {"study": _studies.c.study_uid, "series": _series.c.series_uid,
            "instance": _instances.c.sop_uid}[level]


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _plan(conn: Connection, level: str, uid: str) -> Plan:
    rows = conn.execute(
        select(_instances.c.pk, _instances.c.sop_uid, _instances.c.object_id,
               _instances.c.quarantined, _instances.c.size, _series.c.pk,
               _series.c.series_uid, _series.c.modality, _studies.c.pk,
               _studies.c.study_uid, _patients.c.pk, _patients.c.patient_id,
               _patients.c.key_id)
        .join(_series, _instances.c.series_pk == _series.c.pk)
        .join(_studies, _series.c.study_pk == _studies.c.pk)
        .join(_patients, _studies.c.patient_pk == _patients.c.pk)
        .where(_column(level) == uid)
        .order_by(_studies.c.pk, _series.c.pk, _instances.c.pk)).all()
    if not rows:
        raise NotFound(f"no such {level}")
    per_series: dict[int, int] = {}
    series_study: dict[int, int] = {}
    study_patient: dict[int, int] = {}
    patient_key: dict[int, str] = {}
    for r in rows:
        per_series[int(r[5])] = per_series.get(int(r[5]), 0) + 1
        series_study[int(r[5])] = int(r[8])
        study_patient[int(r[8])] = int(r[10])
        patient_key[int(r[10])] = str(r[12])
    # rows left empty: a series whose every instance goes, a study whose every series
    # goes, a patient whose every study goes
    emptied_series = {pk for pk, n in per_series.items()
                      if n == _count(conn, _instances, _instances.c.series_pk == pk)}
    emptied_studies = {
        pk for pk in set(series_study.values())
        if _count(conn, _series, _series.c.study_pk == pk)
        == sum(1 for s in emptied_series if series_study[s] == pk)}
    emptied_patients = {
        pk for pk in set(study_patient.values())
        if _count(conn, _studies, _studies.c.patient_pk == pk)
        == sum(1 for s in emptied_studies if study_patient[s] == pk)}
    # a data key is destroyed once no instance and no patient refers to it any more
    deleting_by_key = _keys_in_chunks(conn, [int(r[0]) for r in rows])
    candidates = {patient_key[p] for p in emptied_patients} | set(deleting_by_key)
    destroyed = tuple(sorted(
        key for key in candidates
        if _count(conn, _instances, _instances.c.key_id == key) == deleting_by_key.get(key, 0)
        and _count(conn, _patients, _patients.c.key_id == key)
        == sum(1 for p in emptied_patients if patient_key[p] == key)))
    return Plan(
        level=level, uid=uid,
        sop_uids=tuple(str(r[1]) for r in rows),
        series_uids=tuple(dict.fromkeys(str(r[6]) for r in rows)),
        study_uids=tuple(dict.fromkeys(str(r[9]) for r in rows)),
        patient_ids=tuple(dict.fromkeys(str(r[11]) for r in rows)),
        object_ids=tuple(str(r[2]) for r in rows),
        quarantined=sum(1 for r in rows if r[3] is not None),
        size=sum(int(r[4] or 0) for r in rows),
        modalities=tuple(sorted({str(r[7]) for r in rows if r[7]})),
        series_removed=len(emptied_series), studies_removed=len(emptied_studies),
        patients_removed=len(emptied_patients), keys_destroyed=destroyed,
        study_patients=tuple(dict((str(r[9]), str(r[11])) for r in rows).items()),
        sop_studies=tuple((str(r[1]), str(r[9])) for r in rows),
    )


def _keys_in_chunks(conn: Connection, pks: list[int]) -> dict[str, int]:
    """Data key id -> how many of these instances are encrypted under it."""
    counts: dict[str, int] = {}
    for chunk in _chunks(pks):
        for key_id, count in conn.execute(
                select(_instances.c.key_id, func.count())
                .where(_instances.c.pk.in_(chunk)).group_by(_instances.c.key_id)):
            counts[str(key_id)] = counts.get(str(key_id), 0) + int(count)
    return counts


def _count(conn: Connection, table: Table, *where: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where))
               .scalar_one())


def _record(conn: Connection, action: str, level: str, uid: str, reason: str, actor: str,
            address: str, instances: int, keys: int, pending: list[str] | None = None) -> int:
    result = conn.execute(insert(_actions).values(
        time=utcnow(), action=action, level=level, uid=uid, reason=reason,
        actor=actor[:64], address=address[:64], instances=instances, keys_destroyed=keys,
        pending=json.dumps(pending) if pending else ""))
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _delete_rows(conn: Connection, plan: Plan) -> None:
    """Instances, then the rows they leave empty, then the keys nobody refers to."""
    series_pks: set[int] = set()
    study_pks: set[int] = set()
    patient_pks: set[int] = set()
    for chunk in _chunks(plan.sop_uids):
        for series_pk, study_pk, patient_pk in conn.execute(
                select(_series.c.pk, _studies.c.pk, _studies.c.patient_pk)
                .join(_studies, _series.c.study_pk == _studies.c.pk)
                .join(_instances, _instances.c.series_pk == _series.c.pk)
                .where(_instances.c.sop_uid.in_(chunk)).distinct()):
            series_pks.add(int(series_pk))
            study_pks.add(int(study_pk))
            patient_pks.add(int(patient_pk))
        conn.execute(delete(_instances).where(_instances.c.sop_uid.in_(chunk)))
    for pk in series_pks:
        if not _count(conn, _instances, _instances.c.series_pk == pk):
            conn.execute(delete(_series).where(_series.c.pk == pk))
    for pk in study_pks:
        if not _count(conn, _series, _series.c.study_pk == pk):
            conn.execute(delete(_studies).where(_studies.c.pk == pk))
    for pk in patient_pks:
        if not _count(conn, _studies, _studies.c.patient_pk == pk):
            conn.execute(delete(_patients).where(_patients.c.pk == pk))
    _refresh(conn, series_pks, study_pks, patient_pks)
    now = utcnow()
    for key_id in plan.keys_destroyed:
        conn.execute(update(_keys).where(_keys.c.key_id == key_id,
                                         _keys.c.wrapped.is_not(None))
                     .values(wrapped=None, destroyed=now))


def _first_visible(conn: Connection, *where: Any) -> str | None:
    """The stored header of the first visible instance (the archive stores the first
    instance's at every level): what the level answers with from now on."""
    meta: str | None = conn.execute(
        select(_instances.c.meta_json)
        .join(_series, _instances.c.series_pk == _series.c.pk)
        .join(_studies, _series.c.study_pk == _studies.c.pk)
        .where(_instances.c.quarantined.is_(None), *where)
        .order_by(_instances.c.pk).limit(1)).scalar()
    return meta


def _refresh(conn: Connection, series_pks: set[int], study_pks: set[int],
             patient_pks: set[int]) -> None:
    """Counts, modalities and stored headers of the rows that remain, from their visible
    (not quarantined) instances: what C-FIND and QIDO answer with."""
    for pk in series_pks:
        if not _count(conn, _series, _series.c.pk == pk):
            continue
        _update(conn, _series, pk, {"num_instances": _count(
            conn, _instances, _instances.c.series_pk == pk, _instances.c.quarantined.is_(None))},
            _series.c.pk == pk)
    for pk in study_pks:
        if not _count(conn, _studies, _studies.c.pk == pk):
            continue
        visible = conn.execute(select(_series.c.modality, _series.c.num_instances)
                               .where(_series.c.study_pk == pk,
                                      _series.c.num_instances > 0)).all()
        _update(conn, _studies, pk, {
            "num_series": len(visible),
            "num_instances": sum(int(n) for _, n in visible),
            "modalities": "\\".join(sorted({str(m) for m, _ in visible if m}))},
            _studies.c.pk == pk)
    for pk in patient_pks:
        if not _count(conn, _patients, _patients.c.pk == pk):
            continue
        _update(conn, _patients, pk, {}, _studies.c.patient_pk == pk)


def _update(conn: Connection, table: Table, pk: int, values: dict[str, Any],
            level: Any) -> None:
    """Write a remaining row's new ``values`` and, when the level (``level``, a condition on
    its instances' study or series) still has a visible instance, that one's header."""
    meta = _first_visible(conn, level)
    if meta is not None:
        values = {**values, "meta_json": meta}
    if values:
        conn.execute(update(table).where(table.c.pk == pk).values(**values))
