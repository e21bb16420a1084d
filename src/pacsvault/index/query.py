"""Hierarchical queries over the encrypted index: C-FIND today, QIDO-RS tomorrow.

Attributes with an index column are matched in SQL; any other attribute with a value is
matched on the stored DICOM JSON of the record (the first instance received at that level),
still without opening a single image. Answers take their values from that JSON, so every
requested return key is filled with what the modality sent.

Two guards from issue 11: a stored value is answered only in a shape valid for its
dictionary VR (``vr_check.normalised``: headers indexed before VRs were checked at the door
heal here), and a query has a time budget (``time_budget``, the engine's own time, not the
time a slow peer takes to read answers): past it, the SQL statement is interrupted or the
scan stops, and ``QueryBudgetExceeded`` is raised (C-FIND A700, QIDO-RS 413).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.jsonrep import convert_to_python_number
from pydicom.tag import Tag
from sqlalchemy import ColumnElement, Select, exists, func, null, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased, sessionmaker

from pacsvault.dicomfile import vr_check
from pacsvault.index import matching
from pacsvault.index.matching import Condition, Kind
from pacsvault.index.models import Instance, Patient, Series, Study
from pacsvault.index.stored import StoredInstance

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_RANK = {level: i for i, level in enumerate(LEVELS)}


class QueryError(Exception):
    """The identifier cannot be processed (status A900/C000 on the DICOM side)."""


class QueryBudgetExceeded(QueryError):
    """The query ran past its time budget and was stopped (C-FIND A700, QIDO-RS 413)."""


_PROGRESS_STEPS = 10000  # SQLite VM instructions between two looks at the clock


class _Budget:
    """The engine's own time for one query: it runs only while the engine works, not while
    the consumer of the answers (a slow peer) holds the generator suspended."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.started = time.monotonic()

    def resume(self) -> None:
        self.started = time.monotonic()

    def pause(self) -> None:
        self.spent += time.monotonic() - self.started

    def exceeded(self) -> bool:
        if self.seconds is None:
            return False
        return self.spent + (time.monotonic() - self.started) > self.seconds

    def check(self) -> None:
        if self.exceeded():
            raise QueryBudgetExceeded(
                f"the query ran past its {self.seconds:g} s time budget and was stopped; "
                "narrow it")


@dataclass(frozen=True)
class _Col:
    level: str
    column: InstrumentedAttribute[Any]
    kind: Kind


COLUMNS: dict[str, _Col] = {
    "PatientName": _Col("PATIENT", Patient.name_norm, "pn"),
    "PatientID": _Col("PATIENT", Patient.patient_id, "str"),
    "IssuerOfPatientID": _Col("PATIENT", Patient.issuer, "str"),
    "PatientBirthDate": _Col("PATIENT", Patient.birth_date, "date"),
    "PatientSex": _Col("PATIENT", Patient.sex, "str"),
    "StudyInstanceUID": _Col("STUDY", Study.study_uid, "uid"),
    "StudyDate": _Col("STUDY", Study.study_date, "date"),
    "StudyTime": _Col("STUDY", Study.study_time, "time"),
    "AccessionNumber": _Col("STUDY", Study.accession_number, "str"),
    "StudyID": _Col("STUDY", Study.study_id, "str"),
    "StudyDescription": _Col("STUDY", Study.description, "str"),
    "ReferringPhysicianName": _Col("STUDY", Study.referring_physician_norm, "pn"),
    "SeriesInstanceUID": _Col("SERIES", Series.series_uid, "uid"),
    "Modality": _Col("SERIES", Series.modality, "str"),
    "SeriesNumber": _Col("SERIES", Series.series_number, "int"),
    "SeriesDescription": _Col("SERIES", Series.description, "str"),
    "BodyPartExamined": _Col("SERIES", Series.body_part, "str"),
    "SeriesDate": _Col("SERIES", Series.series_date, "date"),
    "SeriesTime": _Col("SERIES", Series.series_time, "time"),
    "PerformedProcedureStepStartDate": _Col("SERIES", Series.performed_start_date, "date"),
    "PerformedProcedureStepStartTime": _Col("SERIES", Series.performed_start_time, "time"),
    "SOPInstanceUID": _Col("IMAGE", Instance.sop_uid, "uid"),
    "SOPClassUID": _Col("IMAGE", Instance.sop_class_uid, "uid"),
    "InstanceNumber": _Col("IMAGE", Instance.instance_number, "int"),
    "ContentDate": _Col("IMAGE", Instance.content_date, "date"),
    "ContentTime": _Col("IMAGE", Instance.content_time, "time"),
}

# Return keys computed from the index rather than copied from an instance.
_COMPUTED_LEVEL = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "ModalitiesInStudy": "STUDY",
    "SOPClassesInStudy": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}
_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
         "InstanceAvailability"}
_VR_KIND: dict[str, Kind] = {"PN": "pn", "DA": "date", "TM": "time", "UI": "uid"}


def _int_clause(cond: Condition, column: InstrumentedAttribute[Any]) -> ColumnElement[bool]:
    try:
        if cond.op == "equal":
            return column == int(cond.value)
        if cond.op == "list":
            return column.in_([int(v) for v in cond.items])
    except ValueError:
        raise QueryError("a numeric key has a non-numeric value") from None
    raise QueryError("wildcards and ranges do not apply to numbers")


@dataclass
class Accessed:
    """Patients and studies disclosed by a query (bounded: a trail record stays small)."""

    limit: int = 1000
    patient_ids: set[str] = field(default_factory=set)
    study_uids: set[str] = field(default_factory=set)
    truncated: bool = False

    def add(self, patient_id: str | None, study_uid: str | None) -> None:
        if len(self.patient_ids) + len(self.study_uids) >= self.limit:
            self.truncated = True
            return
        if patient_id is not None:
            self.patient_ids.add(patient_id)
        if study_uid is not None:
            self.study_uids.add(study_uid)


@dataclass
class _Filter:
    sql: list[ColumnElement[bool]]
    meta: list[tuple[str, Any]]  # (tag hex, Condition | list of item conditions)


class QueryEngine:
    def __init__(self, sessions: sessionmaker[Session], ae_title: str, *,
                 time_budget: float | None = None) -> None:
        self._sessions = sessions
        self._ae_title = ae_title
        self._time_budget = time_budget

    # --- C-FIND / QIDO --------------------------------------------------------------

    def find(
        self, level: str, identifier: Dataset, *, root: str = "STUDY",
        accessed: Accessed | None = None,
    ) -> Iterator[Dataset]:
        """Yield one answer per matching record, streaming from the database.

        ``accessed`` collects which patients and studies the answers disclosed, for the
        audit trail ("who saw this patient's data" includes who listed it).
        """
        for answer in self.find_json(level, identifier, root=root, accessed=accessed,
                                     for_dimse=True):
            yield json_to_dataset(answer)

    def find_json(
        self, level: str, identifier: Dataset, *, root: str = "STUDY",
        accessed: Accessed | None = None, for_dimse: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """``find``'s answers as DICOM JSON (no pydicom dataset is built: QIDO-RS emits
        them as they are). ``for_dimse`` adds QueryRetrieveLevel and RetrieveAETitle."""
        if level not in LEVELS or (root == "STUDY" and level == "PATIENT"):
            raise QueryError("unsupported query level for this information model")
        budget = _Budget(self._time_budget)
        filt = self._filter(level, identifier)
        stmt = self._select(level).where(*filt.sql)
        charset = _answer_charset(identifier)
        plan = _plan(identifier)
        with self._sessions() as session:
            budget.check()
            raw: Any = session.connection().connection.driver_connection
            # A long SQL step (a LIKE over many rows) is interrupted from inside SQLite.
            raw.set_progress_handler(lambda: 1 if budget.exceeded() else 0, _PROGRESS_STEPS)
            try:
                for record, study_uid, patient_id in session.execute(stmt).yield_per(256):
                    budget.check()
                    meta: dict[str, Any] = json.loads(record.meta_json or "{}")
                    if not all(_meta_matches(meta.get(tag), cond) for tag, cond in filt.meta):
                        continue
                    if accessed is not None:
                        accessed.add(patient_id, study_uid)
                    answer = self._answer(session, level, record, meta, plan, charset,
                                          for_dimse)
                    budget.pause()
                    yield answer
                    budget.resume()
            except OperationalError:
                if budget.exceeded():
                    budget.check()
                raise
            finally:
                raw.set_progress_handler(None, 0)

    def _select(self, level: str) -> Select[Any, Any, Any]:
        """The level's records, with the study UID and patient ID they belong to."""
        # No ORDER BY: C-FIND answers have no order, and sorting would hold every matching
        # row (with its stored header) in memory before the first answer could stream.
        # Quarantined instances (``storage.removal``) are never answered, nor the series,
        # studies and patients left with none visible (``num_instances`` counts visible
        # instances only).
        if level == "PATIENT":
            return select(Patient, null(), Patient.patient_id).where(exists().where(
                Study.patient_pk == Patient.pk, Study.num_instances > 0))
        if level == "STUDY":
            return (select(Study, Study.study_uid, Patient.patient_id)
                    .join(Patient, Study.patient_pk == Patient.pk)
                    .where(Study.num_instances > 0))
        if level == "SERIES":
            return (select(Series, Study.study_uid, Patient.patient_id)
                    .join(Study, Series.study_pk == Study.pk)
                    .join(Patient, Study.patient_pk == Patient.pk)
                    .where(Series.num_instances > 0))
        return (select(Instance, Study.study_uid, Patient.patient_id)
                .join(Series, Instance.series_pk == Series.pk)
                .join(Study, Series.study_pk == Study.pk)
                .join(Patient, Study.patient_pk == Patient.pk)
                .where(Instance.quarantined.is_(None)))

    def _filter(self, level: str, identifier: Dataset) -> _Filter:
        sql: list[ColumnElement[bool]] = []
        meta: list[tuple[str, Any]] = []
        for elem in identifier:
            keyword = elem.keyword
            if keyword in _SKIP or elem.tag.is_private or elem.tag.group == 0x0002:
                continue
            if elem.VR == "SQ":
                items = _sequence_conditions(elem)
                if items:
                    meta.append((f"{elem.tag:08X}", items))
                continue
            raw = _text(elem)
            if keyword == "ModalitiesInStudy":
                # A study-level key. Below the study level it matches on the parent
                # study's modalities, like every other higher-level key here (PS3.4
                # C.4.1.2.2 lets an SCP match or ignore it; matching is what a user who
                # typed it means). The subquery reads its own alias of Series: with the
                # outer query's Series (SERIES and IMAGE levels) SQLAlchemy correlated
                # both tables away and the statement had no FROM (C000, issue 13 defect 4).
                cond = matching.parse("str", raw)
                if not cond.is_universal and _RANK[level] >= _RANK["STUDY"]:
                    other = aliased(Series)
                    sql.append(exists().where(other.study_pk == Study.pk,
                                              other.num_instances > 0,
                                              cond.clause(other.modality)))
                continue
            col = COLUMNS.get(keyword)
            if col is not None:
                if _RANK[col.level] > _RANK[level]:
                    continue  # a lower-level key in a higher-level query: not a filter
                cond = matching.parse(col.kind, raw)
                if cond.is_universal:
                    continue
                sql.append(
                    _int_clause(cond, col.column) if col.kind == "int"
                    else cond.clause(col.column)
                )
                continue
            if keyword in _COMPUTED_LEVEL:
                continue
            cond = matching.parse(_VR_KIND.get(str(elem.VR), "str"), raw)
            if not cond.is_universal:
                meta.append((f"{elem.tag:08X}", cond))
        return _Filter(sql, meta)

    # --- C-MOVE / C-GET selection ------------------------------------------------------

    def instances(self, level: str, identifier: Dataset) -> list[StoredInstance]:
        """The instances a retrieve request names by its unique keys.

        The unique key of the requested level must be given, as a value or a list, never a
        wildcard or empty: "retrieve everything" is how an exposed archive is harvested.
        """
        unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
                  "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}.get(level)
        if unique is None:
            raise QueryError("unsupported retrieve level")
        stmt = (
            select(Instance, Series.series_uid, Study.study_uid)
            .join(Series, Instance.series_pk == Series.pk)
            .join(Study, Series.study_pk == Study.pk)
            .join(Patient, Study.patient_pk == Patient.pk)
            .where(Instance.quarantined.is_(None))  # quarantine: kept, never retrieved
            .order_by(Study.pk, Series.pk, Instance.instance_number, Instance.pk)
        )
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            col = COLUMNS[keyword]
            if _RANK[col.level] > _RANK[level]:
                break
            raw = _text(identifier[keyword]) if keyword in identifier else ""
            cond = matching.parse("uid", raw)  # exact values and lists only
            if keyword == unique and (cond.is_universal or "*" in raw or "?" in raw):
                raise QueryError(f"{unique} must name what to retrieve")
            if not cond.is_universal:
                stmt = stmt.where(cond.clause(col.column))
        with self._sessions() as session:
            return [
                StoredInstance(inst.sop_uid, study_uid, series_uid, inst.object_id,
                               uuid.UUID(inst.key_id), inst.size)
                for inst, series_uid, study_uid in session.execute(stmt)
            ]

    # --- answers ----------------------------------------------------------------------

    def _answer(
        self, session: Session, level: str, record: Any, meta: dict[str, Any],
        plan: _Plan, charset: str | None, for_dimse: bool,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tag, keyword, vr, sequence in plan.keys:
            col = COLUMNS.get(keyword)
            value = meta.get(tag)
            if value is not None:  # never a value in a shape its VR does not allow
                value = vr_check.normalised(tag, value)
            if value is None or (col is not None and _RANK[col.level] > _RANK[level]):
                out[tag] = {"vr": vr}
            elif sequence is not None:
                out[tag] = _sequence_answer(value, sequence, _sequence_conditions(sequence))
            else:
                out[tag] = _strip_bulk(value)
        if charset == "ISO_IR 100" and not _fits_latin1(out):
            charset = "ISO_IR 192"
        if charset:
            out["00080005"] = {"vr": "CS", "Value": [charset]}
        if for_dimse:
            out["00080052"] = {"vr": "CS", "Value": [level]}
            out["00080054"] = {"vr": "AE", "Value": [self._ae_title]}
        if plan.availability:
            out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        for tag, keyword, vr in plan.computed:
            value = self._computed(session, keyword, record)
            if isinstance(value, list):
                out[tag] = {"vr": vr, "Value": value} if value else {"vr": vr}
            else:
                out[tag] = {"vr": vr, "Value": [value]}
        return out

    @staticmethod
    def _computed(session: Session, keyword: str, record: Any) -> Any:
        if keyword == "NumberOfStudyRelatedSeries":
            return record.num_series
        if keyword == "NumberOfStudyRelatedInstances":
            return record.num_instances
        if keyword == "NumberOfSeriesRelatedInstances":
            return record.num_instances
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


@dataclass(frozen=True)
class _Plan:
    """What each answer to one identifier holds, worked out once per query."""

    keys: list[tuple[str, str, str, DataElement | None]]  # tag, keyword, VR, sequence key
    computed: list[tuple[str, str, str]]  # tag, keyword, VR
    availability: bool


def _plan(identifier: Dataset) -> _Plan:
    keys: list[tuple[str, str, str, DataElement | None]] = []
    computed: list[tuple[str, str, str]] = []
    for elem in identifier:
        keyword = elem.keyword
        if keyword in _SKIP or elem.tag.group == 0x0002:
            continue
        tag = f"{elem.tag:08X}"
        if keyword in _COMPUTED_LEVEL:
            computed.append((tag, keyword, str(elem.VR)))
            continue
        keys.append((tag, keyword, str(elem.VR), elem if elem.VR == "SQ" else None))
    return _Plan(keys, computed, "InstanceAvailability" in identifier)


_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_NUMBER_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
_SIMPLE_VRS = _TEXT_VRS | _NUMBER_VRS | {"PN"}
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _simple_value(vr: str, entry: dict[str, Any]) -> tuple[bool, Any]:
    """(True, value) for the plain cases, as ``Dataset.from_json`` would build it;
    (False, None) for anything else (sequences, binary, odd values)."""
    if vr not in _SIMPLE_VRS:
        return False, None
    values = entry.get("Value")
    if len(entry) == 1 or (len(entry) == 2 and values == []):
        return True, empty_value_for_VR(vr)
    if len(entry) != 2 or not isinstance(values, list):
        return False, None
    if vr == "PN":
        names = []
        for v in values:
            if not isinstance(v, dict) or not all(
                    isinstance(v.get(k, ""), str) for k in _PN_GROUPS):
                return False, None
            names.append("=".join(v.get(k, "") for k in _PN_GROUPS).rstrip("="))
        return True, names[0] if len(names) == 1 else names
    if vr in _TEXT_VRS:
        if not all(isinstance(v, str) for v in values):
            return False, None
        return True, values[0] if len(values) == 1 else values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return False, None
    return True, convert_to_python_number(values[0] if len(values) == 1 else values, vr)


def json_to_dataset(answer: dict[str, Any]) -> Dataset:
    """``Dataset.from_json`` for an answer, building plain elements directly (several times
    faster); sequences, binary values and anything unusual still go through pydicom."""
    ds = Dataset()
    rest: dict[str, Any] = {}
    for tag_hex, entry in answer.items():
        vr = entry.get("vr")
        ok, value = _simple_value(vr, entry) if isinstance(vr, str) else (False, None)
        if ok:
            ds.add(DataElement(int(tag_hex, 16), vr, value))
        else:
            rest[tag_hex] = entry
    if rest:
        for elem in Dataset.from_json(rest):
            ds.add(elem)
    return ds


# --- helpers on DICOM JSON values --------------------------------------------------------


def _text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _json_strings(entry: dict[str, Any]) -> list[str]:
    values = entry.get("Value") or []
    out = []
    for v in values:
        if isinstance(v, dict):
            out.append("=".join(
                v.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")
            ).rstrip("="))
        else:
            out.append(str(v))
    return out or [""]


def _meta_matches(entry: dict[str, Any] | None, cond: Any) -> bool:
    if isinstance(cond, list):  # sequence: some item matches every item condition
        items = (entry or {}).get("Value") or []
        return any(
            all(_meta_matches(item.get(tag), sub) for tag, sub in cond) for item in items
        )
    if entry is not None and not isinstance(entry, dict):
        entry = None
    return any(cond.matches(v) for v in _json_strings(entry or {}))


def _sequence_conditions(elem: DataElement) -> list[tuple[str, Any]]:
    if not elem.value:
        return []
    item: Dataset = elem.value[0]
    conds: list[tuple[str, Any]] = []
    for sub in item:
        if sub.VR == "SQ":
            nested = _sequence_conditions(sub)
            if nested:
                conds.append((f"{sub.tag:08X}", nested))
            continue
        cond = matching.parse(_VR_KIND.get(str(sub.VR), "str"), _text(sub))
        if not cond.is_universal:
            conds.append((f"{sub.tag:08X}", cond))
    return conds


def _sequence_answer(
    entry: dict[str, Any], elem: DataElement, conds: list[tuple[str, Any]]
) -> dict[str, Any]:
    """PS3.4 C.2.2.2.6: the matching items, holding only the requested attributes; a key
    with no item or one empty item asks for the whole sequence."""
    items = entry.get("Value") or []
    wanted = [f"{sub.tag:08X}" for sub in elem.value[0]] if elem.value else []
    if not wanted:
        return {"vr": "SQ", "Value": [_strip_bulk_item(i) for i in items]}
    matching_items = [
        i for i in items if all(_meta_matches(i.get(tag), sub) for tag, sub in conds)
    ]
    return {
        "vr": "SQ",
        "Value": [
            {t: _strip_bulk(i[t]) if t in i else {"vr": _vr_of(t)} for t in wanted}
            for i in matching_items
        ],
    }


def _vr_of(tag_hex: str) -> str:
    try:
        return str(dictionary_VR(Tag(int(tag_hex, 16))))
    except KeyError:
        return "UN"


def _strip_bulk(entry: dict[str, Any]) -> dict[str, Any]:
    if "BulkDataURI" in entry or "InlineBinary" in entry:
        return {"vr": entry.get("vr", "UN")}
    if entry.get("vr") == "SQ":
        return {"vr": "SQ", "Value": [_strip_bulk_item(i) for i in entry.get("Value") or []]}
    return entry


def _strip_bulk_item(item: dict[str, Any]) -> dict[str, Any]:
    return {t: _strip_bulk(e) for t, e in item.items()}


def _answer_charset(identifier: Dataset) -> str | None:
    """Answer in UTF-8 unless the query asked for Latin-1: every stored text fits UTF-8."""
    requested = identifier.get("SpecificCharacterSet")
    if requested in ("ISO_IR 100", ["ISO_IR 100"]):
        return "ISO_IR 100"
    return "ISO_IR 192"


def _fits_latin1(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_fits_latin1(v) for v in value.values())
    if isinstance(value, list):
        return all(_fits_latin1(v) for v in value)
    return True


def level_of(keyword: str) -> str | None:
    col = COLUMNS.get(keyword)
    return col.level if col else _COMPUTED_LEVEL.get(keyword)


