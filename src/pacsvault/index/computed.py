"""Return keys computed from the index rather than copied from a stored header.

Why here and once: C-FIND and QIDO-RS both answer them (QIDO used to compute the study
and series ones itself, with its own queries, below their level: issue 15). A key asked
at its own level or below is the record's (or its parent's) value: a series answer's
``NumberOfStudyRelatedInstances`` is its study's. Asked above its level (a series count
in a study answer) it has no single value and is answered empty, as any lower-level key.

Parents are reached through the ORM relationships: a study already loaded in the query's
session is not read again, so the cost is one small query per distinct parent, not per
answer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacsvault.index.levels import Level
from pacsvault.index.models import Instance, Patient, Series, Study

# Each computed key and the level it describes.
COMPUTED: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfPatientRelatedSeries": Level.PATIENT,
    "NumberOfPatientRelatedInstances": Level.PATIENT,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "ModalitiesInStudy": Level.STUDY,
    "SOPClassesInStudy": Level.STUDY,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
}


def value(session: Session, keyword: str, record: Any, level: Level) -> Any:
    """The key's value for a ``level`` record: a number, a list (possibly empty), or
    None when the key describes a level below the record's."""
    own = COMPUTED[keyword]
    if level.above(own):
        return None
    if keyword == "NumberOfSeriesRelatedInstances":
        return _series_of(record).num_instances
    if keyword == "NumberOfStudyRelatedSeries":
        return _study_of(record).num_series
    if keyword == "NumberOfStudyRelatedInstances":
        return _study_of(record).num_instances
    if keyword == "ModalitiesInStudy":
        # Asked below the study level too (issue 13 defect 4): the parent study's.
        return [m for m in _study_of(record).modalities.split("\\") if m]
    if keyword == "SOPClassesInStudy":
        return sorted(session.scalars(
            select(Instance.sop_class_uid).distinct()
            .join(Series, Instance.series_pk == Series.pk)
            .where(Series.study_pk == _study_of(record).pk,
                   Instance.quarantined.is_(None))))
    studies = select(Study).where(Study.patient_pk == _patient_pk(record)).subquery()
    if keyword == "NumberOfPatientRelatedStudies":
        return session.scalar(select(func.count()).select_from(studies))
    if keyword == "NumberOfPatientRelatedSeries":
        return session.scalar(select(func.coalesce(func.sum(studies.c.num_series), 0)))
    return session.scalar(select(func.coalesce(func.sum(studies.c.num_instances), 0)))


def _series_of(record: Any) -> Series:
    if isinstance(record, Series):
        return record
    return record.series  # type: ignore[no-any-return]


def _study_of(record: Any) -> Study:
    """The study a record belongs to (study-level return keys at lower levels)."""
    if isinstance(record, Study):
        return record
    if isinstance(record, Series):
        return record.study
    return record.series.study  # type: ignore[no-any-return]


def _patient_pk(record: Any) -> int:
    """Patient-related counts are return keys at every level of the Study Root too."""
    if isinstance(record, Patient):
        return record.pk
    if isinstance(record, Study):
        return record.patient_pk
    if isinstance(record, Series):
        return record.study.patient_pk
    return int(record.series.study.patient_pk)
