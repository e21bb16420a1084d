"""Turn received bytes into a validated record of what the index needs.

Parsing happens in memory on the bytes exactly as received; nothing is transcoded. pydicom's
own warnings are silenced here because they quote element values (a birth date, a name)
and would carry patient data into plain logs.

Validation at the door (issue 11): a deflated dataset is inflated within
``max_inflated_mb`` (``inflate``; beyond it ``ObjectTooLarge``, status A700), and a
top-level element whose VR is of another class than the data dictionary's is refused
(``MismatchedVR``, status C000; ``vr_check``), so no client is ever answered a value in a
shape it cannot read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import PIXEL_KEYWORDS, Dataset
from pydicom.jsonrep import convert_to_python_number
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import AMBIGUOUS_VR

from pacsvault.dicomfile import fastparse, inflate, vr_check

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_BULK_THRESHOLD = 1024
BULK_MARKER = fastparse.BULK_MARKER
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SOP_INSTANCE_UID = 0x00080018
_STUDY_UID = 0x0020000D

pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

# the top-level attributes ``describe`` and ``identity`` read (``_value``)
_TAGS: dict[str, BaseTag] = {
    keyword: BaseTag(tag_for_keyword(keyword) or 0) for keyword in (
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
        "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
        "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
        "ReferringPhysicianName", "Modality", "SeriesNumber", "SeriesDescription",
        "BodyPartExamined", "SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime", "InstanceNumber", "Rows", "Columns",
        "NumberOfFrames", "ContentDate", "ContentTime")
}
# the same, as ``fastparse.walk`` keeps them: tag -> the dictionary's VR
_WANTED = {int(tag): str(dictionary_VR(tag)) for tag in _TAGS.values()}


class UnreadableObject(Exception):
    """The bytes are not a DICOM dataset we can parse (status C000)."""


class InvalidObject(Exception):
    """A parsable dataset that lacks what an archive needs to file it (status A900)."""


class MismatchedVR(UnreadableObject):
    """An element encoded with a VR the data dictionary does not allow (status C000)."""


class ObjectTooLarge(UnreadableObject):
    """A deflated dataset expanding beyond ``max_inflated_mb``: refused before it is
    inflated (status A700 "out of resources" where the caller knows this class, C000
    otherwise)."""


@dataclass(frozen=True)
class ParsedInstance:
    """Everything the index stores about one received instance."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str
    performed_start_date: str
    performed_start_time: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    content_date: str
    content_time: str
    meta_json: str
    sha256: bytes
    size: int

    def __repr__(self) -> str:  # keep patient attributes out of tracebacks and logs
        return f"ParsedInstance(sop_class={self.sop_class_uid}, size={self.size})"


def _value(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``: a converted element's value is read from it directly
    (``Dataset.get`` by keyword costs a ``__getattr__``, a keyword look-up and a
    ``__getitem__`` each, ~30 times per image; issue 17); a raw one (before
    ``_convert_all``, as for ``identity``) the way pydicom reads it."""
    elem = ds._dict.get(_TAGS[keyword])
    if elem is None:
        return None
    if not isinstance(elem, DataElement):
        return ds.get(keyword)
    return elem.value


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    return _as_text(_value(ds, keyword))


def is_uid(value: str) -> bool:
    """A UID's syntax (PS3.5 9.1): digits and dots, at most 64 characters. The one check
    for received objects and for UIDs in DICOMweb paths."""
    return bool(value) and len(value) <= 64 and _UID.match(value) is not None


def _uid(ds: Dataset, keyword: str) -> str:
    return _checked_uid(_text(ds, keyword), keyword)


def _checked_uid(value: str, keyword: str) -> str:
    if not is_uid(value):
        raise InvalidObject(f"missing or invalid {keyword}")
    return value


def _bulk(_elem: DataElement) -> str:
    return BULK_MARKER


def _truncated(elem: DataElement | RawDataElement | None) -> bool:
    return (
        isinstance(elem, RawDataElement)
        and elem.length != _UNDEFINED_LENGTH
        and elem.value is not None
        and len(elem.value) != elem.length
    )


def _check_lengths(ds: Dataset) -> None:
    """pydicom silently accepts an element whose value runs past the end of the stream.
    (The stored elements themselves: ``get_item`` would return the same ones, as nothing
    is read lazily from an in-memory stream.)"""
    for elem in list(ds._dict.values()):
        if _truncated(elem):
            raise UnreadableObject("element value shorter than its declared length")


_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_SLOW_RAW_VRS = frozenset({"SQ", "UN", *AMBIGUOUS_VR})


def _convert_all(ds: Dataset) -> None:
    """Convert every element from its raw form, recursing into sequences: what
    ``for elem in ds.iterall(): elem.value`` does (same order, same conversions, same
    errors), without ``Dataset.__getitem__``/``__setitem__`` for plain elements.

    Why: that loop is how ``describe`` makes a broken value fail while a failure status
    can still be sent, and ``__getitem__`` (tag normalisation, ``__setitem__`` with its
    private-tag and pixel bookkeeping, the element looked up three more times) was a
    third of ``describe``'s time for a CT slice (issue 17). A plain element (not
    private, not a sequence, no ambiguous or unknown VR, not the character set or pixel
    data, value in memory) is converted by the same ``convert_raw_data_element`` call
    with the same encoding and stored as ``__setitem__`` would store it; every other
    element goes through ``ds[tag]`` as before.
    """
    elements = ds._dict
    for tag in sorted(elements):
        elem = elements[tag]
        if isinstance(elem, RawDataElement) and not (
            tag.is_private or tag == _SPECIFIC_CHARACTER_SET or tag in PIXEL_KEYWORDS
            or elem.VR in _SLOW_RAW_VRS or (elem.value is None and elem.length != 0)
        ):
            encoding = ds.original_character_set or ds._character_set
            converted = convert_raw_data_element(elem, encoding=encoding, ds=ds)
            if converted.VR != "SQ" and converted.VR not in AMBIGUOUS_VR:
                elements[tag] = converted
                continue
            # (an implicit VR element the dictionary calls a sequence or ambiguous:
            # left raw, converted below by pydicom's own path)
        current = ds[tag]
        _ = current.value
        if current.VR == "SQ":
            for item in current.value:
                _convert_all(item)


_VALUE_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC",
                        "UI", "UR", "UT", "IS", "DS", "US", "SS", "UL", "SL", "FL", "FD",
                        "UV", "SV"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def _fast_entry(elem: DataElement) -> dict[str, Any] | None:
    """``elem.to_json_dict(_bulk, _BULK_THRESHOLD)`` for the common VRs (None: others)."""
    vr = elem.VR
    value = elem.value
    if vr in _VALUE_VRS:
        if value is None or (isinstance(value, (str, bytes)) and not value):
            return {"vr": vr}
        if isinstance(value, (list, MultiValue)):
            if not value:
                return {"vr": vr}
            values = list(value)
        elif isinstance(value, (str, int, float)):
            values = [value]
        else:
            return None
        return {"vr": vr, "Value": convert_to_python_number(values, vr)}
    if vr in _BINARY_VRS and isinstance(value, bytes):
        if not value:
            return {"vr": vr}
        if len(value) > (_BULK_THRESHOLD // 4) * 3:
            return {"vr": vr, "BulkDataURI": BULK_MARKER}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("utf-8")}
    return None


def header_json(ds: Dataset) -> dict[str, Any]:
    """The dataset as DICOM JSON, bulk values as markers: what pydicom's
    ``to_json_dict(bulk_data_threshold=1024, ..., suppress_invalid_tags=True)`` returns
    (a test compares them), building plain elements directly."""
    out: dict[str, Any] = {}
    elements = ds._dict
    with pydicom_config.strict_reading():
        for key in ds.keys():  # noqa: SIM118 - iterating a Dataset yields elements
            entry: dict[str, Any] | None
            try:
                # converted already by ``describe``'s check; a raw one (nothing is read
                # lazily from memory) is converted by ``ds[key]`` as ``get_item`` did
                stored = elements[key]
                elem = stored if isinstance(stored, DataElement) else ds[key]
                entry = _fast_entry(elem)
                if entry is None:
                    entry = elem.to_json_dict(
                        bulk_data_element_handler=_bulk, bulk_data_threshold=_BULK_THRESHOLD)
            except Exception:  # as suppress_invalid_tags does: leave the element out
                entry = None
            if entry is not None:
                out[f"{key:08X}"] = entry
    return out


def read(raw: bytes, *, stop_before_pixels: bool = False,
         specific_tags: list[Any] | None = None) -> Dataset:
    """Read a Part 10 byte stream into a dataset whose values are still raw (cheap); a
    deflated dataset is inflated within the configured limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return inflate.read(raw, stop_before_pixels=stop_before_pixels,
                                specific_tags=specific_tags)
        except inflate.InflateLimitExceeded as exc:
            raise ObjectTooLarge(str(exc)) from None
        except Exception as exc:  # pydicom raises a wide range on hostile input
            raise UnreadableObject(type(exc).__name__) from None


def read_received(raw: bytes) -> Dataset | fastparse.Header:
    """A received stream for ``identity`` and ``describe``: decoded by ``fastparse`` when
    it is plainly readable there (several times cheaper, the same answers: issue 17),
    else ``read``'s dataset."""
    header = fastparse.walk(raw, _WANTED)
    return header if header is not None else read(raw)


def identity(ds: Dataset | fastparse.Header) -> tuple[str, str] | None:
    """(SOP Instance UID, Study Instance UID) if both are valid, without full parsing."""
    if isinstance(ds, fastparse.Header):
        sop = str(ds.values.get(_SOP_INSTANCE_UID) or "").strip()
        study = str(ds.values.get(_STUDY_UID) or "").strip()
        return (sop, study) if is_uid(sop) and is_uid(study) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if any(_truncated(ds.get_item(tag)) for tag in (_SOP_INSTANCE_UID, _STUDY_UID)):
                return None
            return _uid(ds, "SOPInstanceUID"), _uid(ds, "StudyInstanceUID")
        except Exception:
            return None


def parse(raw: bytes) -> ParsedInstance:
    """Parse a Part 10 byte stream (preamble + file meta + dataset) completely."""
    return describe(read_received(raw), raw)


def describe(ds: Dataset | fastparse.Header, raw: bytes) -> ParsedInstance:
    """Validate every element of ``read``'s dataset (or ``read_received``'s header) and
    extract what the index needs, with the SHA-256 of ``raw`` (computed here, in the
    caller's thread: hashing lets the interpreter's lock go, issue 17)."""
    if isinstance(ds, fastparse.Header):
        return _describe_header(ds, raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _check_lengths(ds)
            # Touch every element so a wrong length or a broken value fails here, while
            # we can still answer with a failure status, not later in a viewer.
            _convert_all(ds)
            meta_ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        except UnreadableObject:
            raise
        except Exception as exc:  # pydicom raises a wide range on hostile input
            raise UnreadableObject(type(exc).__name__) from None
        if not meta_ts:
            raise UnreadableObject("no transfer syntax")
        sop_class = _uid(ds, "SOPClassUID")
        sop_uid = _uid(ds, "SOPInstanceUID")
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        try:
            meta = header_json(ds)
        except Exception:
            meta = {}
    return _instance(lambda keyword: _value(ds, keyword),
                     (sop_class, sop_uid, study_uid, series_uid), meta_ts, meta, raw)


def _describe_header(header: fastparse.Header, raw: bytes) -> ParsedInstance:
    """``describe`` for a ``fastparse.Header``: the same checks in the same order (the
    walk has checked every length and value, which is where pydicom's path fails first),
    on the same DICOM JSON and values."""
    values = header.values

    def uid(keyword: str) -> str:
        return _checked_uid(_as_text(values.get(int(_TAGS[keyword]))), keyword)

    sop_class = uid("SOPClassUID")
    sop_uid = uid("SOPInstanceUID")
    study_uid = uid("StudyInstanceUID")
    series_uid = uid("SeriesInstanceUID")
    return _instance(lambda keyword: values.get(int(_TAGS[keyword])),
                     (sop_class, sop_uid, study_uid, series_uid), header.syntax, header.meta,
                     raw)


def _instance(get: Callable[[str], Any], uids: tuple[str, str, str, str], syntax: str,
              meta: dict[str, Any], raw: bytes) -> ParsedInstance:
    """The checks both ``describe`` paths end with, on the DICOM JSON, then the record:
    ``get`` gives an attribute's top-level value by keyword (None when absent)."""
    mismatch = vr_check.first_mismatch(meta)
    if mismatch is not None:
        raise MismatchedVR(mismatch)
    meta = vr_check.sanitise(meta)  # same-class variants relabelled, nested ones healed
    meta.pop("7FE00010", None)

    def text(keyword: str) -> str:
        return _as_text(get(keyword))

    def number(keyword: str) -> int | None:
        return _as_int(get(keyword))

    sop_class, sop_uid, study_uid, series_uid = uids
    return ParsedInstance(
        sop_class_uid=sop_class,
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax=syntax,
        patient_id=text("PatientID"),
        issuer=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        birth_date=text("PatientBirthDate"),
        sex=text("PatientSex"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        accession_number=text("AccessionNumber"),
        study_id=text("StudyID"),
        study_description=text("StudyDescription"),
        referring_physician=text("ReferringPhysicianName"),
        modality=text("Modality"),
        series_number=number("SeriesNumber"),
        series_description=text("SeriesDescription"),
        body_part=text("BodyPartExamined"),
        series_date=text("SeriesDate"),
        series_time=text("SeriesTime"),
        performed_start_date=text("PerformedProcedureStepStartDate"),
        performed_start_time=text("PerformedProcedureStepStartTime"),
        instance_number=number("InstanceNumber"),
        rows=number("Rows"),
        columns=number("Columns"),
        number_of_frames=number("NumberOfFrames"),
        content_date=text("ContentDate"),
        content_time=text("ContentTime"),
        meta_json=json.dumps(meta, separators=(",", ":")),
        sha256=hashlib.sha256(raw).digest(),
        size=len(raw),
    )
