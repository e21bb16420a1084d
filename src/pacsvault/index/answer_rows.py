"""What the query engine reads of the index's rows (``index.query``), built once (issue 17).

Each level's base statement (``level_select``), the study answer's plain columns
(``STUDY_ANSWER``: no ORM entity per answered study) and the loader options that leave the
encrypted columns an answer never reads undecrypted (``undecrypted``). Kept apart from the
engine so that ``query`` stays about matching and answering.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, exists, null, select
from sqlalchemy.orm import defer

from pacsvault.index import sealing
from pacsvault.index.levels import Level
from pacsvault.index.models import Instance, Patient, SealedTime, Series, Study


@functools.cache
def level_select(level: Level) -> Select[Any, Any, Any]:
    """The level's records, with the study UID and patient ID they belong to. Built once
    per level: a statement is immutable (each ``where`` makes a new one), and building
    its joins again for every query was a good part of a query's fixed cost (issue 17)."""
    # No ORDER BY: C-FIND answers have no order, and sorting would hold every matching
    # row (with its stored header) in memory before the first answer could stream.
    # Quarantined instances (``storage.removal``) are never answered, nor the series,
    # studies and patients left with none visible (``num_instances`` counts visible
    # instances only).
    if level is Level.PATIENT:
        return select(Patient, null(), Patient.patient_id).where(exists().where(
            Study.patient_pk == Patient.pk, Study.num_instances > 0))
    if level is Level.STUDY:
        return (select(Study, Study.study_uid, Patient.patient_id)
                .join(Patient, Study.patient_pk == Patient.pk)
                .where(Study.num_instances > 0))
    if level is Level.SERIES:
        return (select(Series, Study.study_uid, Patient.patient_id)
                .join(Study, Series.study_pk == Study.pk)
                .join(Patient, Study.patient_pk == Patient.pk)
                .where(Series.num_instances > 0))
    return (select(Instance, Study.study_uid, Patient.patient_id)
            .join(Series, Instance.series_pk == Series.pk)
            .join(Study, Series.study_pk == Study.pk)
            .join(Patient, Study.patient_pk == Patient.pk)
            .where(Instance.quarantined.is_(None)))


@functools.cache
def undecrypted(entity: Any) -> tuple[Any, ...]:
    """Loader options leaving out the encrypted columns an answer never reads (it reads
    the stored header, the counts and the keys): on a sealed index each would be
    decrypted for every answer. Any code that reads one still gets it, loaded then."""
    return tuple(defer(attr) for attr in entity.__mapper__.column_attrs
                 if attr.key != "meta_json" and isinstance(
                     attr.columns[0].type, sealing.Sealed | sealing.Fixed | SealedTime))


# What a study answer reads of its record (``study_record``): a row of plain columns, not
# an ORM entity (issue 16: loading ~500 entities per unlimited QIDO-RS answer was a good part
# of its cost on the sealed index). The stored header is still read here, only here.
STUDY_ANSWER = (Study.pk, Study.study_uid, Patient.patient_id, Study.meta_json,
                 Study.patient_pk, Study.num_series, Study.num_instances, Study.modalities)


@functools.cache
def study_answers() -> Select[Any, Any, Any, Any, Any, Any, Any, Any]:
    """``level_select`` of studies reading ``STUDY_ANSWER`` only (built once)."""
    return level_select(Level.STUDY).with_only_columns(*STUDY_ANSWER)


def study_record(row: Any) -> tuple[Any, str, str]:
    """(record, study UID, patient ID) of a ``STUDY_ANSWER`` row. The record holds what
    ``_answer`` reads of it: the stored header, and for computed keys (``index.computed``)
    the counts, modalities and keys, as a transient ``Study`` built only when the plan asks
    for one (never added to the session)."""
    pk, study_uid, patient_id, meta_json, patient_pk, nser, ninst, modalities = row
    return StudyRow(pk, patient_pk, nser, ninst, modalities, meta_json), study_uid, patient_id


@dataclass(slots=True)
class StudyRow:
    """A study record as a study answer reads it (``STUDY_ANSWER``). The computed keys
    (``index.computed``) get a transient ``Study`` of the same values (``entity``), never
    added to the session; the three a study list asks for every study are read here
    directly, the same values ``computed.value`` gives (``_computed``)."""

    pk: int
    patient_pk: int
    num_series: int
    num_instances: int
    modalities: str
    meta_json: str

    def entity(self) -> Study:
        return Study(pk=self.pk, patient_pk=self.patient_pk, num_series=self.num_series,
                     num_instances=self.num_instances, modalities=self.modalities)
