"""DICOM JSON (PS3.18 F) values as the index stores them: back to pydicom datasets, and
without their bulk data.

Why here, at the bottom: the query engine (``index``) answers from stored DICOM JSON,
C-FIND (``dicom``) turns answers into datasets, QIDO-RS and WADO-RS (``web``) render the
same JSON; one copy of each rule keeps them from drifting (issue 15: ``_strip_bulk`` was
written twice, with two behaviours that are now one function's two modes).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.jsonrep import convert_to_python_number

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_NUMBER_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
_SIMPLE_VRS = _TEXT_VRS | _NUMBER_VRS | {"PN"}
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


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
                    isinstance(v.get(k, ""), str) for k in PN_GROUPS):
                return False, None
            names.append("=".join(v.get(k, "") for k in PN_GROUPS).rstrip("="))
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


def strip_bulk(entry: Any, *, keep_empty: bool = True) -> Any:
    """An entry without bulk data (``BulkDataURI``/``InlineBinary``), sequences walked.

    ``keep_empty``: a bulk element becomes the empty ``{"vr": ...}`` (C-FIND/QIDO answers to
    a requested key: the key is answered, its value is not); otherwise it is left out
    (``None`` at the top; QIDO's ``includefield=all``, which lists what there is)."""
    if not isinstance(entry, dict):
        return entry
    if "BulkDataURI" in entry or "InlineBinary" in entry:
        return {"vr": entry.get("vr", "UN")} if keep_empty else None
    if entry.get("vr") == "SQ":
        return {"vr": "SQ", "Value": [strip_bulk_item(i, keep_empty=keep_empty)
                                      for i in entry.get("Value") or []]}
    return entry


def strip_bulk_item(item: dict[str, Any], *, keep_empty: bool = True) -> dict[str, Any]:
    """A sequence item's entries through ``strip_bulk`` (left-out ones dropped)."""
    return {t: s for t, e in item.items()
            if (s := strip_bulk(e, keep_empty=keep_empty)) is not None}
