"""QIDO-RS (PS3.18 10.6): query parameters -> a C-FIND identifier -> DICOM JSON answers.

Matching is ``index.query.QueryEngine``'s, shared with C-FIND: wildcards, date/time ranges,
UID lists, case-insensitive person names. The query string arrives already percent-decoded
(``DE%2A`` is ``DE*``), as HTTP clients encode ``*``.

Choices, documented:

- Keys are keywords or tags (``PatientName``, ``00100010``), dotted for sequences
  (``RequestAttributesSequence.ScheduledProcedureStepID``); repeated keys and commas in UID
  values are value lists. An unknown or private key is a 400.
- ``includefield`` is repeatable and takes comma lists; ``all`` returns every attribute the
  index holds for the record (the first instance received at that level): patient and study
  attributes at study level, plus series attributes at series level, the whole instance
  header (without bulk data) at instance level.
- ``fuzzymatching=true`` is accepted and ignored, with the Warning header PS3.18 asks for
  (only literal matching is performed); ``false`` is the default.
- ``limit`` defaults to and is capped at ``MAX_RESULTS``; when more results exist the
  answer carries ``Warning: 299 ... additional results``. No match: 200 with ``[]``.
- A query has a time budget (``[query] time_budget_seconds``); past it the search stops
  and the answer is 413 with a message asking to narrow it: PS3.18's status for a query
  "too broad" (a 503 would invite the same query again). The failure is audited.
- Stored values are answered only in a shape valid for their dictionary VR
  (``vr_check``): a header indexed before VRs were checked at the door cannot break a
  viewer's study list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from sqlalchemy import select

from pacsvault.dicom import vr_check
from pacsvault.index import matching
from pacsvault.index.models import Instance, Series, Study
from pacsvault.index.query import Accessed, QueryEngine
from pacsvault.vault import Vault

MAX_RESULTS = 1000
MAX_PARAMS = 200
WARNING_MORE = '299 pacsvault "There are additional results that can be requested"'
WARNING_FUZZY = ('299 pacsvault "The fuzzymatching parameter is not supported. Only literal '
                 'matching has been performed."')

RANK = {"STUDY": 1, "SERIES": 2, "IMAGE": 3}

# PS3.18 Tables 10.6.3-3/-4/-5: default return attributes per level.
STUDY_DEFAULTS = (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber",
    "InstanceAvailability", "ModalitiesInStudy", "ReferringPhysicianName",
    "TimezoneOffsetFromUTC", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULTS = (
    "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
    "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence", "StudyInstanceUID",
)
IMAGE_DEFAULTS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
    "TimezoneOffsetFromUTC", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
    "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID",
)

# Computed keys the engine answers only at their own level; below it we fill them here.
STUDY_COMPUTED = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                  "ModalitiesInStudy", "SOPClassesInStudy")
SERIES_COMPUTED = ("NumberOfSeriesRelatedInstances",)

# Attributes of the patient, study and series levels (for includefield=all).
PATIENT_GROUP = 0x0010
STUDY_TAGS = frozenset({
    0x00080020, 0x00080030, 0x00080050, 0x00080051, 0x00080090, 0x00080096, 0x00080201,
    0x00081030, 0x00081032, 0x00081048, 0x00081060, 0x00081080, 0x00081110, 0x0020000D,
    0x00200010, 0x00321032, 0x00321060, 0x00380010, 0x00101010, 0x00101020, 0x00101030,
})
SERIES_TAGS = frozenset({
    0x00080021, 0x00080031, 0x00080060, 0x00080070, 0x00080080, 0x00080081, 0x00081010,
    0x0008103E, 0x0008103F, 0x00081040, 0x00081050, 0x00081070, 0x00081090, 0x00081111,
    0x00180015, 0x00181000, 0x00181020, 0x00185100, 0x0020000E, 0x00200011, 0x00200052,
    0x00200060, 0x00201040, 0x00400244, 0x00400245, 0x00400253, 0x00400254, 0x00400260,
    0x00400275,
})

_BINARY_NUMBERS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int,
                   "FL": float, "FD": float}
_RESERVED = {"includefield", "limit", "offset", "fuzzymatching", "accept", "charset"}


class QidoError(Exception):
    """An invalid query (400). Messages never quote the request's values."""


@dataclass
class QidoQuery:
    level: str
    identifier: Dataset
    include_all: bool = False
    limit: int = MAX_RESULTS
    offset: int = 0
    warnings: list[str] = field(default_factory=list)
    # ModalitiesInStudy matched here below study level (the engine matches it at study level)
    modalities: matching.Condition | None = None


# --- parsing ------------------------------------------------------------------------------


def _tag_of(piece: str) -> BaseTag:
    text = piece.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        tag = Tag(int(text, 16))
    else:
        number = tag_for_keyword(text)
        if number is None:
            raise QidoError("unknown attribute in the query")
        tag = Tag(number)
    if tag.is_private:
        raise QidoError("private attributes cannot be queried")
    try:
        dictionary_VR(tag)
    except KeyError:
        raise QidoError("unknown attribute in the query") from None
    return tag


def _path(key: str) -> list[BaseTag]:
    pieces = key.split(".")
    if len(pieces) > 4:
        raise QidoError("sequence paths are limited to four levels")
    tags = [_tag_of(p) for p in pieces]
    for tag in tags[:-1]:
        if dictionary_VR(tag) != "SQ":
            raise QidoError("only sequences may have nested attributes")
    return tags


def _vr(tag: BaseTag) -> str:
    return str(dictionary_VR(tag)).split(" or ")[0]


def _value(vr: str, raw: str | None) -> Any:
    if raw is None or raw == "":
        return None
    if vr == "UI":
        return "\\".join(v.strip() for v in raw.replace(",", "\\").split("\\"))
    if vr in _BINARY_NUMBERS:
        try:
            values = [_BINARY_NUMBERS[vr](v) for v in raw.split("\\")]
        except ValueError:
            raise QidoError("a numeric attribute has a non-numeric value") from None
        return values[0] if len(values) == 1 else values
    if vr == "SQ":
        raise QidoError("a sequence cannot have a value; name its attributes")
    return raw


def _put(ds: Dataset, path: list[BaseTag], raw: str | None, *, overwrite: bool) -> None:
    tag = path[0]
    if len(path) > 1:
        if tag not in ds:
            ds.add_new(tag, "SQ", [Dataset()])
        elif not ds[tag].value:
            ds[tag].value = [Dataset()]
        _put(ds[tag].value[0], path[1:], raw, overwrite=overwrite)
        return
    if tag in ds and not overwrite:
        return
    vr = _vr(tag)
    try:
        ds.add_new(tag, vr, [] if vr == "SQ" else _value(vr, raw))
    except QidoError:
        raise
    except Exception:  # pydicom's own value validation
        raise QidoError("an attribute has a value of the wrong form") from None


def _int_param(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise QidoError(f"{name} must be a non-negative integer") from None
    if value < 0:
        raise QidoError(f"{name} must be a non-negative integer")
    return value


def parse(
    items: Iterable[tuple[str, str]], level: str, *, study: str | None = None,
    series: str | None = None,
) -> QidoQuery:
    """Build the identifier of a QIDO request at ``level`` within the path's scope."""
    query = QidoQuery(level, Dataset())
    matches: dict[str, tuple[list[BaseTag], list[str]]] = {}
    includes: list[str] = []
    pairs = list(items)
    if len(pairs) > MAX_PARAMS:
        raise QidoError("too many query parameters")
    for key, value in pairs:
        name = key.strip()
        lowered = name.lower()
        if lowered == "includefield":
            includes += [v.strip() for v in value.split(",") if v.strip()]
        elif lowered == "limit":
            limit = _int_param(value, "limit")
            query.limit = min(limit, MAX_RESULTS) if limit else MAX_RESULTS
        elif lowered == "offset":
            query.offset = _int_param(value, "offset")
        elif lowered == "fuzzymatching":
            if value.strip().lower() == "true":
                if WARNING_FUZZY not in query.warnings:
                    query.warnings.append(WARNING_FUZZY)
            elif value.strip().lower() not in ("false", ""):
                raise QidoError("fuzzymatching is true or false")
        elif lowered in _RESERVED:
            continue  # accept/charset: the answer is always UTF-8 DICOM JSON
        else:
            path = _path(name)
            canonical = ".".join(f"{t:08X}" for t in path)
            matches.setdefault(canonical, (path, []))[1].append(value)
    ds = query.identifier
    for path, values in matches.values():
        joined = "\\".join(v for v in values if v != "") if len(values) > 1 else values[0]
        _put(ds, path, joined, overwrite=True)
    if study is not None:
        ds.StudyInstanceUID = study
    if series is not None:
        ds.SeriesInstanceUID = series
    for token in includes:
        if token.lower() == "all":
            query.include_all = True
        else:
            _put(ds, _path(token), None, overwrite=False)
    defaults: list[str] = []
    if level == "STUDY":
        defaults += STUDY_DEFAULTS
    elif level == "SERIES":
        defaults += SERIES_DEFAULTS
        if study is None:
            defaults += STUDY_DEFAULTS
    else:
        defaults += IMAGE_DEFAULTS
        if series is None:
            defaults += SERIES_DEFAULTS
        if study is None:
            defaults += STUDY_DEFAULTS
    for keyword in defaults:
        number = tag_for_keyword(keyword)
        assert number is not None
        _put(ds, [Tag(number)], None, overwrite=False)
    if level != "STUDY" and "ModalitiesInStudy" in ds:
        value = ds["ModalitiesInStudy"].value
        raw = ("\\".join(str(v) for v in value) if isinstance(value, (list, MultiValue))
               else str(value or ""))
        cond = matching.parse("str", raw)
        query.modalities = None if cond.is_universal else cond
    return query


# --- running ------------------------------------------------------------------------------


@dataclass
class _Disclosed(Accessed):
    """Counts as disclosed only the answers actually returned (not those skipped by
    ``offset`` or beyond ``limit``): the engine reports each record just before yielding
    it, and the caller keeps or drops it."""

    pending: tuple[str | None, str | None] | None = None

    def add(self, patient_id: str | None, study_uid: str | None) -> None:
        self.pending = (patient_id, study_uid)

    def keep(self) -> None:
        if self.pending is not None:
            super().add(*self.pending)
        self.pending = None


@dataclass
class QidoResult:
    answers: list[dict[str, Any]]
    more: bool
    accessed: Accessed


def _engine_identifier(query: QidoQuery) -> Dataset:
    """The identifier without the computed keys the engine cannot answer at this level."""
    ds = Dataset()
    strip = set()
    if RANK[query.level] > RANK["STUDY"]:
        strip |= set(STUDY_COMPUTED)
    if RANK[query.level] > RANK["SERIES"]:
        strip |= set(SERIES_COMPUTED)
    for elem in query.identifier:
        if elem.keyword not in strip:
            ds.add(elem)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        number = tag_for_keyword(keyword)
        assert number is not None
        if keyword_level(keyword) <= RANK[query.level] and keyword not in ds:
            ds.add_new(number, "UI", None)
    return ds


def keyword_level(keyword: str) -> int:
    return {"StudyInstanceUID": 1, "SeriesInstanceUID": 2, "SOPInstanceUID": 3}[keyword]


def _strip_bulk(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    if "BulkDataURI" in entry or "InlineBinary" in entry:
        return None
    if entry.get("vr") == "SQ":
        return {"vr": "SQ", "Value": [
            {t: s for t, e in item.items() if (s := _strip_bulk(e)) is not None}
            for item in entry.get("Value") or []
        ]}
    return entry


def _level_allows(level: str, tag_hex: str) -> bool:
    tag = int(tag_hex, 16)
    if level == "IMAGE":
        return (tag >> 16) != 0x0002
    allowed = (tag >> 16) == PATIENT_GROUP or tag in STUDY_TAGS
    if level == "SERIES":
        allowed = allowed or tag in SERIES_TAGS
    return allowed


class _Lookups:
    """Per-request caches of study/series facts and stored headers."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._studies: dict[str, tuple[int, int, list[str]] | None] = {}
        self._series: dict[str, int | None] = {}

    def study(self, uid: str) -> tuple[int, int, list[str]] | None:
        if uid not in self._studies:
            with self._vault.sessions() as s:
                row = s.execute(select(Study.num_series, Study.num_instances, Study.modalities)
                                .where(Study.study_uid == uid)).first()
            self._studies[uid] = None if row is None else (
                int(row[0]), int(row[1]), [m for m in str(row[2]).split("\\") if m])
        return self._studies[uid]

    def sop_classes(self, uid: str) -> list[str]:
        with self._vault.sessions() as s:
            return sorted(s.scalars(
                select(Instance.sop_class_uid).distinct()
                .join(Series, Instance.series_pk == Series.pk)
                .join(Study, Series.study_pk == Study.pk)
                .where(Study.study_uid == uid)))

    def series_count(self, uid: str) -> int | None:
        if uid not in self._series:
            with self._vault.sessions() as s:
                count = s.scalar(select(Series.num_instances).where(Series.series_uid == uid))
            self._series[uid] = None if count is None else int(count)
        return self._series[uid]

    def meta(self, level: str, uid: str) -> dict[str, Any]:
        model: Any = {"STUDY": Study, "SERIES": Series, "IMAGE": Instance}[level]
        column = {"STUDY": Study.study_uid, "SERIES": Series.series_uid,
                  "IMAGE": Instance.sop_uid}[level]
        with self._vault.sessions() as s:
            text = s.scalar(select(model.meta_json).where(column == uid))
        try:
            value = json.loads(text or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def _json_text(answer: dict[str, Any], tag: str) -> str:
    values = (answer.get(tag) or {}).get("Value") or []
    return str(values[0]).strip() if values and values[0] is not None else ""


def _put_json(answer: dict[str, Any], tag: str, vr: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    answer[tag] = {"vr": vr, "Value": values} if values else {"vr": vr}


_TAG_NUM_STUDY_SERIES = "00201206"
_TAG_NUM_STUDY_INSTANCES = "00201208"
_TAG_MODALITIES = "00080061"
_TAG_SOP_CLASSES = "00080062"
_TAG_NUM_SERIES_INSTANCES = "00201209"


def _finish(
    answer: dict[str, Any], query: QidoQuery, wanted: set[str], lookups: _Lookups, base: str
) -> dict[str, Any] | None:
    """Complete one engine answer (DICOM JSON); None if it fails a match made here."""
    out = answer
    study_uid = _json_text(out, "0020000D")
    series_uid = _json_text(out, "0020000E")
    sop_uid = _json_text(out, "00080018")
    if query.level != "STUDY" and (wanted & set(STUDY_COMPUTED) or query.modalities):
        facts = lookups.study(study_uid)
        if facts is not None:
            if query.modalities is not None and not any(
                    query.modalities.matches(m) for m in facts[2]):
                return None
            if "NumberOfStudyRelatedSeries" in wanted:
                _put_json(out, _TAG_NUM_STUDY_SERIES, "IS", facts[0])
            if "NumberOfStudyRelatedInstances" in wanted:
                _put_json(out, _TAG_NUM_STUDY_INSTANCES, "IS", facts[1])
            if "ModalitiesInStudy" in wanted:
                _put_json(out, _TAG_MODALITIES, "CS", facts[2])
            if "SOPClassesInStudy" in wanted:
                _put_json(out, _TAG_SOP_CLASSES, "UI", lookups.sop_classes(study_uid))
    if query.level == "IMAGE" and "NumberOfSeriesRelatedInstances" in wanted:
        count = lookups.series_count(series_uid)
        if count is not None:
            _put_json(out, _TAG_NUM_SERIES_INSTANCES, "IS", count)
    if query.include_all:
        uid = {"STUDY": study_uid, "SERIES": series_uid, "IMAGE": sop_uid}[query.level]
        for tag_hex, entry in lookups.meta(query.level, uid).items():
            if not _level_allows(query.level, tag_hex):
                continue
            current = out.get(tag_hex)
            if current is not None and ("Value" in current or "BulkDataURI" in current):
                continue
            stripped = _strip_bulk(vr_check.normalised(tag_hex, entry))
            if stripped is not None:
                out[tag_hex] = stripped
    url = f"{base}/studies/{study_uid}"
    if query.level in ("SERIES", "IMAGE"):
        url += f"/series/{series_uid}"
    if query.level == "IMAGE":
        url += f"/instances/{sop_uid}"
    out["00081190"] = {"vr": "UR", "Value": [url]}
    if "Value" not in out.get(_TAG_MODALITIES, {"Value": True}):
        # A study whose objects carry no Modality: leave the attribute out rather than
        # send it empty, which OHIF's study list cannot read (the whole list fails).
        # Kept by test_qido_for_ohif.py.
        del out[_TAG_MODALITIES]
    return dict(sorted(out.items()))


def search(vault: Vault, query: QidoQuery, base: str) -> QidoResult:
    """Run the query (blocking: call from a worker thread)."""
    engine = QueryEngine(vault.sessions, vault.settings.server.ae_title,
                         time_budget=vault.settings.query.time_budget_seconds)
    disclosed = _Disclosed()
    lookups = _Lookups(vault)
    answers: list[dict[str, Any]] = []
    more = False
    skipped = 0
    found = engine.find_json(query.level, _engine_identifier(query), root="STUDY",
                             accessed=disclosed)
    wanted = {elem.keyword for elem in query.identifier}
    try:
        for raw in found:
            answer = _finish(raw, query, wanted, lookups, base)
            if answer is None:
                continue
            if skipped < query.offset:
                skipped += 1
                continue
            if len(answers) >= query.limit:
                more = True
                break
            disclosed.keep()
            answers.append(answer)
    finally:
        found.close()  # type: ignore[attr-defined]
    return QidoResult(answers, more, disclosed)


def describe_level(level: str) -> str:
    return {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}[level]


