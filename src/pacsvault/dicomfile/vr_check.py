"""Element VRs checked against the data dictionary, on the DICOM JSON the index keeps.

One object whose PatientName was encoded with VR US was accepted and answered by QIDO as
``{"vr":"US","Value":[513,8195]}``; OHIF's study list then failed for every physician
(issue 11, defect 3). Each VR has a JSON shape (PS3.18 F.2): person names are objects,
text is strings, numbers are numbers, binary is base64 or a bulk data URI, sequences are
items. A value in the shape of another *class* of VR is what breaks clients, so:

- **at the door** (``first_mismatch``): a top-level public element whose VR is of another
  class than every VR the dictionary allows for it is refused (status C000, with the tag
  and both VRs in the trail). UN is allowed (unknown content is still valid JSON), as are
  the dictionary's own alternatives ("US or SS", "OB or OW"). Private tags, group lengths
  and tags the dictionary does not know are not checked;
- **tolerated and relabelled** (``normalised``): a VR of the same class (LO for SH, OB for
  OW, FD for DS, SS for US when the values fit) is a common and harmless modality quirk;
  its entry is labelled with the dictionary's VR so clients never see the raw mismatch;
- **healed in answers**: the same ``normalised`` runs on what the index already holds
  (headers stored before this check, and elements nested in sequences, which are never
  refused): an entry that cannot be made valid for its dictionary VR is left out.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag

_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI",
                   "UR", "UT"})
_NUMBER = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_CLASS = {**{vr: "text" for vr in _TEXT}, **{vr: "number" for vr in _NUMBER},
          **{vr: "binary" for vr in _BINARY}, "PN": "pn", "SQ": "sq", "AT": "at", "UN": "un"}
_INT_RANGE = {
    "US": (0, 2**16 - 1), "SS": (-(2**15), 2**15 - 1), "UL": (0, 2**32 - 1),
    "SL": (-(2**31), 2**31 - 1), "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1),
    "IS": (-(2**31) + 1, 2**31 - 1),
}
_VALUE_KEYS = ("Value", "InlineBinary", "BulkDataURI")


@lru_cache(maxsize=8192)
def dictionary_vrs(tag_hex: str) -> tuple[str, ...] | None:
    """The VRs the dictionary allows for a tag (first = preferred); None when not checked
    (private, group length, unknown, or a tag written oddly)."""
    try:
        tag = int(tag_hex, 16)
    except ValueError:
        return None
    if (tag >> 16) & 1 or tag & 0xFFFF == 0 or (tag >> 16) in (0x0000, 0x0002):
        return None
    try:
        text = str(dictionary_VR(tag))
    except KeyError:
        return None
    vrs = tuple(v.strip() for v in text.split(" or ") if v.strip() in _CLASS)
    return vrs or None


def describe_tag(tag_hex: str) -> str:
    """``(0010,0010) PatientName``: a tag and its keyword, never a value."""
    try:
        tag = int(tag_hex, 16)
    except ValueError:
        return "(invalid tag)"
    keyword = keyword_for_tag(tag) or "private or unknown"
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


def _fits(target: str, entry: dict[str, Any]) -> bool:
    """Whether ``entry``'s value is valid DICOM JSON for ``target`` (same class assumed)."""
    if target not in _NUMBER:
        return True
    values = entry.get("Value")
    if not isinstance(values, list):
        return True
    bounds = _INT_RANGE.get(target)
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if bounds is not None and (not isinstance(v, int) or not bounds[0] <= v <= bounds[1]):
            return False
    return True


def _has_value(entry: dict[str, Any]) -> bool:
    return any(key in entry for key in _VALUE_KEYS)


def _relabel(entry: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any] | None:
    """``entry`` labelled with an allowed VR it can be valid for, or None."""
    vr = entry.get("vr")
    if not _has_value(entry):
        return {**entry, "vr": allowed[0]}
    kind = _CLASS.get(vr) if isinstance(vr, str) else None
    for target in allowed:
        if _CLASS[target] == kind and _fits(target, entry):
            return {**entry, "vr": target}
    return None


def normalised(tag_hex: str, entry: Any) -> dict[str, Any] | None:
    """``entry`` as it may be answered: unchanged when valid, relabelled when the value
    fits the dictionary's VR, None when it cannot be made valid. Recurses into sequences."""
    if not isinstance(entry, dict):
        return None
    current: dict[str, Any] = entry
    vr = current.get("vr")
    if not isinstance(vr, str):
        return None
    allowed = dictionary_vrs(tag_hex)
    if allowed is not None and vr != "UN" and vr not in allowed:
        relabelled = _relabel(current, allowed)
        if relabelled is None:
            return None
        current = relabelled
        vr = current["vr"]
    if vr == "SQ" and isinstance(current.get("Value"), list):
        items = [sanitise(item) if isinstance(item, dict) else {} for item in current["Value"]]
        return {**current, "Value": items}
    return current


def entry_ok(tag_hex: str, entry: dict[str, Any]) -> bool:
    """The entry is valid for the dictionary as it is (no relabelling, no dropping)."""
    return normalised(tag_hex, entry) == entry


def sanitise(meta: dict[str, Any]) -> dict[str, Any]:
    """A stored header (DICOM JSON) with every entry ``normalised`` or left out."""
    out: dict[str, Any] = {}
    for tag_hex, entry in meta.items():
        fixed = normalised(tag_hex, entry)
        if fixed is not None:
            out[tag_hex] = fixed
    return out


def first_mismatch(meta: dict[str, Any]) -> str | None:
    """Why a header must be refused (its first top-level element whose VR is of another
    class than the dictionary's), or None. The reason names tags and VRs, never values."""
    for tag_hex, entry in meta.items():
        if not isinstance(entry, dict):
            continue
        vr = entry.get("vr")
        allowed = dictionary_vrs(tag_hex)
        if allowed is None or vr == "UN" or vr in allowed or not _has_value(entry):
            continue
        if _relabel(entry, allowed) is None:
            return (f"element {describe_tag(tag_hex)} is encoded with VR {vr}, the data "
                    f"dictionary says {' or '.join(allowed)}")
    return None
