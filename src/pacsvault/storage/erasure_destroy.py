"""The destruction in the index: what one erasure (or a restore's forgetting of rows whose
key is gone) deletes, inside one ``BEGIN IMMEDIATE`` transaction under
``PRAGMA secure_delete`` (freed pages zeroed: the rows do not linger in the file).

Why its own module: this is the irreversible part, kept apart from the request and
confirmation flow (``erasure``) so it can be read on its own: rows, the data keys
(``wrapped = NULL``, ``destroyed`` set; refused if another patient shares a key), the
``object_actions`` record that raises the removal generation, and earlier records scrubbed
of the patient's UIDs. Files are deleted afterwards by the caller (``Remover``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, delete, func, insert, select, update

from pacsvault.index import dialect
from pacsvault.index.models import DataKey, Instance, ObjectAction, Patient, Series, Study, utcnow
from pacsvault.storage.erasure_requests import ErasureError, Target
from pacsvault.storage.removal import _count, _refresh

_instances = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)
_keys = cast(Table, DataKey.__table__)
_actions = cast(Table, ObjectAction.__table__)


@contextlib.contextmanager
def secure_transaction(engine: Engine) -> Iterator[Connection]:
    """One ``BEGIN IMMEDIATE`` transaction with ``secure_delete`` on for its length."""
    with engine.connect() as conn:
        dialect.secure_delete(conn, True)
        conn.commit()
        try:
            with conn.begin():
                dialect.take_write_lock(conn)
                yield conn
        finally:
            conn.rollback()
            dialect.secure_delete(conn, False)
            conn.commit()


def erase_rows(conn: Connection, pk: int, target: Target, subject: str, reason: str,
               actor: str, address: str) -> tuple[int, list[str]]:
    """Delete the patient's rows and destroy their keys; returns (record id, object ids
    whose files the caller deletes)."""
    plan = _rows(conn, pk)
    others = [_instances.c.key_id.in_(target.keys)]
    if plan.series:
        others.append(_instances.c.series_pk.not_in(plan.series))
    shared = conn.execute(select(func.count()).select_from(_instances)
                          .where(*others)).scalar_one()
    shared += conn.execute(select(func.count()).select_from(_patients).where(
        _patients.c.key_id.in_(target.keys),
        _patients.c.pk != pk)).scalar_one()
    if shared:
        raise ErasureError("a data key of this patient is used by another "
                           "patient's objects: nothing was erased (report "
                           "this to the maintainers)")
    record = _record(conn, subject, reason, actor, address,
                     len(plan.object_ids), len(target.keys), plan.object_ids)
    _scrub_old_records(conn, plan.uids, record)
    for chunk in _chunks(plan.series):
        conn.execute(delete(_instances).where(_instances.c.series_pk.in_(chunk)))
    for chunk in _chunks(plan.series):
        conn.execute(delete(_series).where(_series.c.pk.in_(chunk)))
    conn.execute(delete(_studies).where(_studies.c.patient_pk == pk))
    conn.execute(delete(_patients).where(_patients.c.pk == pk))
    conn.execute(update(_keys).where(_keys.c.key_id.in_(target.keys))
                 .values(wrapped=None, destroyed=utcnow()))
    return record, plan.object_ids


def forget_rows(conn: Connection, actor: str) -> tuple[int, list[str], int] | None:
    """Delete the rows of every object whose data key is destroyed (``Eraser.
    forget_shredded`` says why); returns (record id, object ids, patients removed), or
    None when there is nothing to forget."""
    destroyed = [str(k) for k in conn.execute(
        select(_keys.c.key_id).where(_keys.c.wrapped.is_(None))).scalars()]
    rows: list[Any] = []
    for chunk in _chunks(destroyed):
        rows += conn.execute(select(
            _instances.c.pk, _instances.c.object_id, _instances.c.series_pk)
            .where(_instances.c.key_id.in_(chunk))).all()
    orphans = []
    for chunk in _chunks(destroyed):
        orphans += [int(pk) for pk in conn.execute(
            select(_patients.c.pk).where(_patients.c.key_id.in_(chunk)))
            .scalars()]
    if not rows and not orphans:
        return None
    object_ids = [str(r[1]) for r in rows]
    record = _record(conn, "restore", "forgetting the rows of destroyed keys",
                     actor, "", len(rows), 0, object_ids, action="forget")
    for chunk in _chunks([int(r[0]) for r in rows]):
        conn.execute(delete(_instances).where(_instances.c.pk.in_(chunk)))
    series = {int(r[2]) for r in rows}
    studies = _prune(conn, _series, series, _series.c.study_pk, _instances.c.series_pk)
    patients = set(orphans) | _prune(conn, _studies, studies, _studies.c.patient_pk,
                                     _series.c.study_pk)
    removed = 0
    for pk in patients:
        if not _count(conn, _studies, _studies.c.patient_pk == pk):
            conn.execute(delete(_patients).where(_patients.c.pk == pk))
            removed += 1
    _refresh(conn, series, studies, patients)
    return record, object_ids, removed


def _prune(conn: Connection, table: Table, pks: set[int], parent: Any,
           child_fk: Any) -> set[int]:
    """Delete the rows ``pks`` of ``table`` (series, studies) that no child row (``child_fk``
    pointing at them) is left under; returns their parents (``parent`` column), pruned
    next."""
    parents: set[int] = set()
    for pk in pks:
        owner = conn.execute(select(parent).where(table.c.pk == pk)).scalar()
        if owner is not None:
            parents.add(int(owner))
        if not _count(conn, child_fk.table, child_fk == pk):
            conn.execute(delete(table).where(table.c.pk == pk))
    return parents


@dataclass(frozen=True)
class _Rows:
    series: list[int]
    object_ids: list[str]
    uids: set[str]


def _chunks(values: Sequence[Any], size: int = 500) -> list[Sequence[Any]]:
    return [values[i:i + size] for i in range(0, len(values), size)]


def _rows(conn: Connection, pk: int) -> _Rows:
    uids: set[str] = set()
    studies = conn.execute(select(_studies.c.pk, _studies.c.study_uid)
                           .where(_studies.c.patient_pk == pk)).all()
    uids.update(str(u) for _, u in studies)
    series = conn.execute(select(_series.c.pk, _series.c.series_uid).where(
        _series.c.study_pk.in_([int(p) for p, _ in studies]))).all() if studies else []
    uids.update(str(u) for _, u in series)
    object_ids: list[str] = []
    for chunk in _chunks([int(p) for p, _ in series]):
        for sop, object_id in conn.execute(select(_instances.c.sop_uid, _instances.c.object_id)
                                           .where(_instances.c.series_pk.in_(chunk))):
            uids.add(str(sop))
            object_ids.append(str(object_id))
    return _Rows([int(p) for p, _ in series], object_ids, uids)


def _record(conn: Connection, subject: str, reason: str, actor: str, address: str,
            instances: int, keys: int, pending: list[str], *, action: str = "erase") -> int:
    result = conn.execute(insert(_actions).values(
        time=utcnow(), action=action, level="patient", uid=subject[:64], reason=reason,
        actor=actor[:64], address=address[:64], instances=instances, keys_destroyed=keys,
        pending=json.dumps(pending) if pending else ""))
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _scrub_old_records(conn: Connection, uids: set[str], record: int) -> None:
    """Earlier quarantine/deletion records of this patient's objects keep their counts
    and actors, but lose the UID and the free-text reason (which may name the patient)."""
    values = sorted(uids)
    for chunk in _chunks(values):
        conn.execute(update(_actions).where(
            _actions.c.uid.in_(chunk), _actions.c.action != "erase")
            .values(uid=f"erased-{record}", reason="(erased with the patient)"))
