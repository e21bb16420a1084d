"""QIDO-RS (PS3.18 10.6): query parameters -> a C-FIND identifier -> DICOM JSON answers.

This module only translates HTTP query parameters into an identifier and renders the
answers (Retrieve URL, tag order). Everything else is ``index.query.QueryEngine``'s, shared
with C-FIND: matching (wildcards, date/time ranges, UID lists, case-insensitive person
names, ``ModalitiesInStudy`` at every level), computed keys, ``includefield=all``,
offset and limit (``QueryEngine.page``). The query string arrives already percent-decoded
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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from pacsvault.index.levels import Level
from pacsvault.index.query import Accessed, QueryEngine
from pacsvault.vault import Vault
from pacsvault.web.errors import DicomWebError

MAX_RESULTS = 1000
MAX_PARAMS = 200
WARNING_MORE = '299 pacsvault "There are additional results that can be requested"'
WARNING_FUZZY = ('299 pacsvault "The fuzzymatching parameter is not supported. Only literal '
                 'matching has been performed."')

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
DEFAULTS = {Level.STUDY: STUDY_DEFAULTS, Level.SERIES: SERIES_DEFAULTS,
            Level.IMAGE: IMAGE_DEFAULTS}

_BINARY_NUMBERS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int,
                   "FL": float, "FD": float}
_RESERVED = {"includefield", "limit", "offset", "fuzzymatching", "accept", "charset"}


class QidoError(DicomWebError):
    """An invalid query (400). Messages never quote the request's values. The one DICOMweb
    error type (``web/errors``) with its status fixed."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@dataclass
class QidoQuery:
    level: str
    identifier: Dataset
    include_all: bool = False
    limit: int = MAX_RESULTS
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


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


def _tag_and_vr(keyword: str) -> tuple[BaseTag, str]:
    number = tag_for_keyword(keyword)
    assert number is not None
    tag = Tag(number)
    return tag, _vr(tag)


# The defaults' tags and VRs, looked up once: a study list adds 17 empty keys per request,
# and their keyword, tag and dictionary lookups were a third of ``parse`` (~50 us, issue 17).
# Each request still gets its own new elements (nothing shared between queries).
_DEFAULT_TAGS = {level: tuple(_tag_and_vr(k) for k in names) for level, names in DEFAULTS.items()}

# And their empty elements, built once: ``DataElement(tag, vr, None)`` runs pydicom's value
# conversion and validation, ~7 us an element, ~0.1 ms of a study list's 17 (issue 17).
# Each request gets new element objects with the same attributes (``_fresh``), never these.
# Sequences are left out: each needs its own ``Sequence``, made by ``Dataset.add``.
_EMPTY = {tag: DataElement(tag, vr, None)
          for tags in _DEFAULT_TAGS.values() for tag, vr in tags if vr != "SQ"}


def _fresh(template: DataElement) -> DataElement:
    """A new element equal to ``template`` (an empty, public, non-sequence one), without
    running the conversion that made it again."""
    elem: DataElement = DataElement.__new__(DataElement)
    elem.__dict__.update(template.__dict__)
    return elem


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
    # The level's own defaults, and those of each level above it that the path leaves open.
    scope = {Level.STUDY: study, Level.SERIES: series}
    target = Level(level)
    defaults: list[tuple[BaseTag, str]] = []
    for step in target.path:
        if step is target or (step in scope and scope[step] is None):
            defaults += _DEFAULT_TAGS[step]
    # ``_put(ds, [tag], None, overwrite=False)``, its lookups done once. An empty public
    # element that is no sequence goes straight into the dataset's dict: for such an
    # element that is all ``Dataset.__setitem__`` does (tests/test_qido_defaults.py).
    elements = ds._dict
    for tag, vr in defaults:
        if tag in elements:
            continue
        template = _EMPTY.get(tag)
        if template is None:
            ds.add(DataElement(tag, vr, []))
        else:
            elements[tag] = _fresh(template)
    return query


# --- running ------------------------------------------------------------------------------


@dataclass
class QidoResult:
    answers: list[dict[str, Any]]
    more: bool
    accessed: Accessed


def _render(answer: dict[str, Any], level: Level, base: str) -> dict[str, Any]:
    """An engine answer as QIDO-RS sends it: its Retrieve URL, tags in order."""
    out = answer
    uids = {step: _json_text(out, step.unique_tag) for step in level.path}
    url = base
    for step in level.path:
        if step is not Level.PATIENT:
            url += f"/{_PATH[step]}/{uids[step]}"
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
    level = Level(query.level)
    # The UIDs the Retrieve URL is made of are always answered. The defaults hold them
    # already, so the query's own identifier is used as it is; a copy (a pydicom Dataset,
    # ~0.1 ms for a study list's keys, issue 17) only when one must be added.
    missing = [step for step in level.path
               if step is not Level.PATIENT and step.unique_key not in query.identifier]
    identifier = query.identifier
    if missing:
        identifier = Dataset()
        for elem in query.identifier:
            identifier.add(elem)
        for step in missing:
            number = tag_for_keyword(step.unique_key)
            assert number is not None
            identifier.add_new(number, "UI", None)
    accessed = Accessed()
    page = engine.page(level, identifier, offset=query.offset, limit=query.limit,
                       accessed=accessed, include_all=query.include_all)
    return QidoResult([_render(a, level, base) for a in page.answers], page.more, accessed)


def _json_text(answer: dict[str, Any], tag: str) -> str:
    values = (answer.get(tag) or {}).get("Value") or []
    return str(values[0]).strip() if values and values[0] is not None else ""


_TAG_MODALITIES = "00080061"
_PATH = {Level.STUDY: "studies", Level.SERIES: "series", Level.IMAGE: "instances"}


def describe_level(level: str) -> str:
    return Level(level).web_name


