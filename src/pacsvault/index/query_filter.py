"""An identifier turned into what the query engine matches: SQL clauses on the index
columns, conditions on the stored headers, and (sealed index) residual conditions.

Apart from ``query`` (the engine: statements, answers, budgets) to keep both small; the
engine's ``_filter`` calls ``build_filter``. The two query errors live here, the lowest
module that raises them; ``index.query`` re-exports them for its callers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_keyword
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import InstrumentedAttribute, aliased

from pacsvault.index import computed, matching, name_match, residual, sealing
from pacsvault.index.headers import VR_KIND, sequence_conditions, text_of
from pacsvault.index.levels import Level
from pacsvault.index.matching import Condition, Kind
from pacsvault.index.models import Instance, Patient, Series, Study


@functools.lru_cache(maxsize=1024)
def keyword_of(tag: int) -> str:
    """``DataElement.keyword`` of an element with this tag, looked up once per tag: it is
    asked for every key of every identifier, twice per query (``build_filter``,
    ``query._plan``), and pydicom's property searches its dictionary each time (~3 us)."""
    return dictionary_keyword(tag) if dictionary_has_tag(tag) else ""


class QueryError(Exception):
    """The identifier cannot be processed (status A900/C000 on the DICOM side)."""


class QueryBudgetExceeded(QueryError):
    """The query ran past its time budget and was stopped (C-FIND A700, QIDO-RS 413)."""


@dataclass(frozen=True)
class _Col:
    level: Level
    column: InstrumentedAttribute[Any]
    kind: Kind


COLUMNS: dict[str, _Col] = {
    "PatientName": _Col(Level.PATIENT, Patient.name_norm, "pn"),
    "PatientID": _Col(Level.PATIENT, Patient.patient_id, "str"),
    "IssuerOfPatientID": _Col(Level.PATIENT, Patient.issuer, "str"),
    "PatientBirthDate": _Col(Level.PATIENT, Patient.birth_date, "date"),
    "PatientSex": _Col(Level.PATIENT, Patient.sex, "str"),
    "StudyInstanceUID": _Col(Level.STUDY, Study.study_uid, "uid"),
    "StudyDate": _Col(Level.STUDY, Study.study_date, "date"),
    "StudyTime": _Col(Level.STUDY, Study.study_time, "time"),
    "AccessionNumber": _Col(Level.STUDY, Study.accession_number, "str"),
    "StudyID": _Col(Level.STUDY, Study.study_id, "str"),
    "StudyDescription": _Col(Level.STUDY, Study.description, "str"),
    "ReferringPhysicianName": _Col(Level.STUDY, Study.referring_physician_norm, "pn"),
    "SeriesInstanceUID": _Col(Level.SERIES, Series.series_uid, "uid"),
    "Modality": _Col(Level.SERIES, Series.modality, "str"),
    "SeriesNumber": _Col(Level.SERIES, Series.series_number, "int"),
    "SeriesDescription": _Col(Level.SERIES, Series.description, "str"),
    "BodyPartExamined": _Col(Level.SERIES, Series.body_part, "str"),
    "SeriesDate": _Col(Level.SERIES, Series.series_date, "date"),
    "SeriesTime": _Col(Level.SERIES, Series.series_time, "time"),
    "PerformedProcedureStepStartDate": _Col(Level.SERIES, Series.performed_start_date, "date"),
    "PerformedProcedureStepStartTime": _Col(Level.SERIES, Series.performed_start_time, "time"),
    "SOPInstanceUID": _Col(Level.IMAGE, Instance.sop_uid, "uid"),
    "SOPClassUID": _Col(Level.IMAGE, Instance.sop_class_uid, "uid"),
    "InstanceNumber": _Col(Level.IMAGE, Instance.instance_number, "int"),
    "ContentDate": _Col(Level.IMAGE, Instance.content_date, "date"),
    "ContentTime": _Col(Level.IMAGE, Instance.content_time, "time"),
}

SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
         "InstanceAvailability"}


def _int_clause(cond: Condition, column: InstrumentedAttribute[Any]) -> ColumnElement[bool]:
    try:
        if cond.op == "equal":
            return column == int(cond.value)
        if cond.op == "list":
            return column.in_([int(v) for v in cond.items])
    except ValueError:
        raise QueryError("a numeric key has a non-numeric value") from None
    raise QueryError("wildcards and ranges do not apply to numbers")


def _name_clause(cond: Condition) -> ColumnElement[bool]:
    """A patient name condition as ``patients.pk IN (SELECT pk FROM patients WHERE ...)``.

    Why: matching per component group (``matching._pn_clause``: instr/substr on the
    column) is no range an index can seek, so SQLite scanned every study and looked its
    patient up (~150 ms at 10,000 studies, issue 17). On its own the condition reads only
    the covering index ``ix_patients_name_norm``, and the studies follow by
    ``ix_studies_patient_pk`` (~1 ms). Same condition, same rows; an alias, so the
    subquery is never correlated with the outer query's patients."""
    inner = aliased(Patient)
    return Patient.pk.in_(select(inner.pk).where(cond.clause(inner.name_norm)))


@dataclass
class Filter:
    sql: list[ColumnElement[bool]]
    meta: list[tuple[str, Any]]  # (tag hex, Condition | list of item conditions)
    # Sealed index only (``index.residual``): conditions checked after decryption, and
    # ModalitiesInStudy when its column cannot be matched in SQL.
    residual: list[residual.Residual] = field(default_factory=list)
    modalities: Condition | None = None
    prefilters: int = 0  # token prefilters among ``sql``
    # Values of the bind parameters in ``sql`` (``name_match``: shared name clauses).
    params: dict[str, Any] = field(default_factory=dict)
    # Embedded index only: what ``sql`` is made of, in its order, as (keyword, condition),
    # each clause ``term_clause``'s (``index.query_raw`` compiles them once per shape).
    terms: list[tuple[str, Condition]] = field(default_factory=list)


def term_clause(keyword: str, cond: Condition, *, sealed: bool = False,
                ) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """One SQL condition of an identifier (an index column, or ``ModalitiesInStudy``)
    and the values of its named bind parameters. ``sealed``: a condition of a sealed
    index that SQL can compare (``residual.in_sql``)."""
    if keyword == "ModalitiesInStudy":
        # The subquery reads its own alias of Series: with the outer query's Series
        # (SERIES and IMAGE levels) SQLAlchemy correlated both tables away and the
        # statement had no FROM (C000, issue 13 defect 4).
        other = aliased(Series)
        return exists().where(other.study_pk == Study.pk, other.num_instances > 0,
                              cond.clause(other.modality)), {}
    col = COLUMNS[keyword]
    if keyword == "PatientName" and not sealed and cond.kind == "pn" \
            and cond.op in ("equal", "wildcard", "list"):
        named = name_match.name_filter(cond)  # built once per shape
        return named.clause, named.params
    if col.kind == "int":
        return _int_clause(cond, col.column), {}
    if keyword == "PatientName":
        return _name_clause(cond), {}
    return cond.clause(col.column), {}


def build_filter(level: Level, identifier: Dataset,
                 sealer: sealing.Sealer | None = None, *, clauses: bool = True) -> Filter:
    """The identifier as SQL clauses (indexed columns), conditions on the stored headers
    (every other key with a value) and, on a sealed index, what is checked after
    decryption; keys of a lower level than the query's are no filter. ``clauses`` False
    (embedded index): ``terms`` only, no clause built (``index.query_raw`` has them)."""
    sql: list[ColumnElement[bool]] = []
    terms: list[tuple[str, Condition]] = []
    meta: list[tuple[str, Any]] = []
    left: list[residual.Residual] = []
    modalities: Condition | None = None
    sealed: list[tuple[str, Any, Condition]] = []  # split together after the loop
    params: dict[str, Any] = {}
    for elem in identifier:
        keyword = keyword_of(elem.tag)
        if keyword in SKIP or elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            items = sequence_conditions(elem)
            if items:
                meta.append((f"{elem.tag:08X}", items))
            continue
        raw = text_of(elem)
        if keyword == "ModalitiesInStudy":
            # A study-level key. Below the study level it matches on the parent
            # study's modalities, like every other higher-level key here (PS3.4
            # C.4.1.2.2 lets an SCP match or ignore it; matching is what a user who
            # typed it means): ``term_clause``.
            cond = matching.parse("str", raw)
            if (not cond.is_universal and not level.above(Level.STUDY)
                    and sealer is not None
                    and not residual.in_sql(Series.modality, "str", cond)):
                modalities = cond
            elif not cond.is_universal and not level.above(Level.STUDY):
                if sealer is None:
                    terms.append((keyword, cond))
                if clauses or sealer is not None:
                    sql.append(term_clause(keyword, cond, sealed=sealer is not None)[0])
            continue
        col = COLUMNS.get(keyword)
        if col is not None:
            if level.above(col.level):
                continue  # a lower-level key in a higher-level query: not a filter
            cond = matching.parse(col.kind, raw)
            if cond.is_universal:
                continue
            if sealer is not None and not residual.in_sql(col.column, col.kind, cond):
                sealed.append((keyword, col.column, cond))
                continue
            if sealer is None:
                terms.append((keyword, cond))
            if clauses or sealer is not None:
                clause, values = term_clause(keyword, cond, sealed=sealer is not None)
                sql.append(clause)
                params.update(values)
            continue
        if keyword in computed.COMPUTED:
            continue
        cond = matching.parse(VR_KIND.get(str(elem.VR), "str"), raw)
        if not cond.is_universal:
            meta.append((f"{elem.tag:08X}", cond))
    prefilters = 0
    if sealer is not None and sealed:
        split, left, prefilters = residual.split_all(sealer, level, sealed)
        sql.extend(split)
    return Filter(sql, meta, left, modalities, prefilters, params, terms)
