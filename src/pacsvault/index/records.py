"""Stored instances as the index knows them: what retrieval needs, read in one query.

Why one module: C-MOVE/C-GET, WADO-RS, ``export`` and the archive's own reads all select
instances and then need the same facts (where the object is, its key, its SOP class,
transfer syntax and frame count). Each used to re-query ``Instance`` after the selection
(issue 15); ``StoredInstance`` now carries them, so one query per request answers all.
The index is the lower layer, so the record lives here and ``storage.archive``
re-exports it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.index.models import Instance, Patient, Series, Study


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance lives and what it is; enough to read and send it back without
    another query."""

    sop_uid: str
    study_uid: str
    series_uid: str
    object_id: str
    key_id: uuid.UUID
    size: int
    sop_class: str = ""
    transfer_syntax: str = ""
    frames: int = 0  # 0 when the instance has no pixel data (by its index row)
    patient_id: str = ""
    # The stored DICOM JSON header, only when asked for (``with_header``): WADO metadata.
    meta_json: str = ""

    def __repr__(self) -> str:  # no UIDs or patient IDs in tracebacks and logs
        return f"StoredInstance(object={self.object_id}, size={self.size})"


def select_instances(*, with_header: bool = False) -> Select[Any, Any, Any]:
    """Instances with their series, study and patient, in retrieval order (study, series,
    instance number). The caller adds its selection."""
    columns: list[Any] = [
        Instance.sop_uid, Study.study_uid, Series.series_uid, Instance.object_id,
        Instance.key_id, Instance.size, Instance.sop_class_uid, Instance.transfer_syntax,
        Instance.rows, Instance.number_of_frames, Patient.patient_id,
    ]
    if with_header:
        columns.append(Instance.meta_json)
    return (
        select(*columns)
        .join(Series, Instance.series_pk == Series.pk)
        .join(Study, Series.study_pk == Study.pk)
        .join(Patient, Study.patient_pk == Patient.pk)
        .order_by(Study.pk, Series.pk, Instance.instance_number, Instance.pk)
    )


def load(sessions: sessionmaker[Session], stmt: Select[Any, Any, Any]) -> list[StoredInstance]:
    """Run ``select_instances``' statement (one query) into records."""
    with sessions() as session:
        rows: list[Any] = list(session.execute(stmt).all())
    return [
        StoredInstance(
            str(row[0]), str(row[1]), str(row[2]), str(row[3]), uuid.UUID(row[4]),
            int(row[5]), str(row[6]), str(row[7]),
            0 if row[8] is None else int(row[9] or 1),
            str(row[10]), str(row[11]) if len(row) > 11 else "",
        )
        for row in rows
    ]


def locate(
    sessions: sessionmaker[Session], *, study_uid: str | None = None,
    patient_id: str | None = None, sop_uid: str | None = None,
) -> list[StoredInstance]:
    """The archive's own selection (export, restore drills, duplicate checks): exact
    values, quarantined instances included (an admin may export them), every instance
    when no selector is given."""
    where: list[ColumnElement[bool]] = []
    if study_uid is not None:
        where.append(Study.study_uid == study_uid)
    if patient_id is not None:
        where.append(Patient.patient_id == patient_id)
    if sop_uid is not None:
        where.append(Instance.sop_uid == sop_uid)
    return load(sessions, select_instances().where(*where))
