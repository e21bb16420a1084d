"""Matching on, and answering from, the stored DICOM JSON header of an index record.

Why apart from the engine (``index.query``): these are pure functions of an identifier's
elements and a stored header (no database), the part of a query that runs once per
candidate record; the engine decides which records are candidates.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pacsvault.dicomfile.dicomjson import PN_GROUPS, strip_bulk, strip_bulk_item
from pacsvault.index import matching
from pacsvault.index.matching import Kind

VR_KIND: dict[str, Kind] = {"PN": "pn", "DA": "date", "TM": "time", "UI": "uid"}


def text_of(elem: DataElement) -> str:
    """An identifier element's value as the query text (multiple values joined by ``\\``)."""
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
            out.append("=".join(v.get(k, "") for k in PN_GROUPS).rstrip("="))
        else:
            out.append(str(v))
    return out or [""]


def meta_matches(entry: dict[str, Any] | None, cond: Any) -> bool:
    """Whether a stored entry matches a condition (a list of item conditions: some item
    of the sequence matches them all)."""
    if isinstance(cond, list):  # sequence: some item matches every item condition
        items = (entry or {}).get("Value") or []
        return any(
            all(meta_matches(item.get(tag), sub) for tag, sub in cond) for item in items
        )
    if entry is not None and not isinstance(entry, dict):
        entry = None
    return any(cond.matches(v) for v in _json_strings(entry or {}))


def sequence_conditions(elem: DataElement) -> list[tuple[str, Any]]:
    """The item conditions a sequence key carries (its first item's non-universal keys)."""
    if not elem.value:
        return []
    item: Dataset = elem.value[0]
    conds: list[tuple[str, Any]] = []
    for sub in item:
        if sub.VR == "SQ":
            nested = sequence_conditions(sub)
            if nested:
                conds.append((f"{sub.tag:08X}", nested))
            continue
        cond = matching.parse(VR_KIND.get(str(sub.VR), "str"), text_of(sub))
        if not cond.is_universal:
            conds.append((f"{sub.tag:08X}", cond))
    return conds


def sequence_answer(
    entry: dict[str, Any], elem: DataElement, conds: list[tuple[str, Any]]
) -> dict[str, Any]:
    """PS3.4 C.2.2.2.6: the matching items, holding only the requested attributes; a key
    with no item or one empty item asks for the whole sequence."""
    items = entry.get("Value") or []
    wanted = [f"{sub.tag:08X}" for sub in elem.value[0]] if elem.value else []
    if not wanted:
        return {"vr": "SQ", "Value": [strip_bulk_item(i) for i in items]}
    matching_items = [
        i for i in items if all(meta_matches(i.get(tag), sub) for tag, sub in conds)
    ]
    return {
        "vr": "SQ",
        "Value": [
            {t: strip_bulk(i[t]) if t in i else {"vr": _vr_of(t)} for t in wanted}
            for i in matching_items
        ],
    }


def _vr_of(tag_hex: str) -> str:
    try:
        return str(dictionary_VR(Tag(int(tag_hex, 16))))
    except KeyError:
        return "UN"


def answer_charset(identifier: Dataset) -> str | None:
    """Answer in UTF-8 unless the query asked for Latin-1: every stored text fits UTF-8."""
    requested = identifier.get("SpecificCharacterSet")
    if requested in ("ISO_IR 100", ["ISO_IR 100"]):
        return "ISO_IR 100"
    return "ISO_IR 192"


def fits_latin1(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(fits_latin1(v) for v in value.values())
    if isinstance(value, list):
        return all(fits_latin1(v) for v in value)
    return True
