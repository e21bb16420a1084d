"""De-identify one DICOM dataset in memory: the recipes (deid) first, then a check walk.

Why two steps: the recipes (``recipes/*.deid``, run by pydicom/deid's ``DicomParser`` on
the in-memory dataset, never a file) carry the rules of PS3.15 Table E.1-1; the walk after
them enforces what must hold whatever a recipe missed (a new attribute, a private tag in a
sequence, a value that names the patient inside free text): no private tag, no person name
but the pseudonym, every non-standard UID replaced, no original date unless shifted, no
string holding one of the patient's identifying values. The walk removes what it finds;
it never lets it through.

Pseudonyms and UIDs are HMAC-SHA256 under the project key (``crypto.keys.project_key``):
the same patient or UID gives the same output in every export of one project, and
nothing linkable in another. A new UID is ``2.25.`` followed by the HMAC as an integer
(PS3.5 B.2, UUID-derived form: 128 bits).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

from pacsvault.deidentify.options import (
    BASIC_CODE,
    MODIFIED_DATES,
    OPTIONS,
    Profile,
)

PSEUDONYM_PREFIX = "PV-"
MAX_SHIFT_DAYS = 3650  # dates move back by 1..10 years, whole days (weekday not kept)
_DATE_VRS = ("DA", "DT")
# Text that may carry a name or an identifier typed by someone (numbers - AS, DS, IS - are
# left out: a short ID would otherwise match inside a pixel spacing and break geometry).
_TEXT_VRS = ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR", "PN")


def _quiet_deid() -> None:
    """deid prints through its own logger ('bot'); our exports print nothing it would
    say (field names and, in some warnings, values)."""
    from deid.logger import bot

    bot.level = 0  # QUIET
    logging.getLogger("deid").setLevel(logging.CRITICAL)


@dataclass
class Identity:
    """What identifies one patient in the source: used to scrub free text and, keyed,
    to derive the pseudonym and date shift. Never printed."""

    patient_id: str
    values: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, ds: Dataset) -> Identity:
        found: set[str] = set()
        for keyword in ("PatientID", "AccessionNumber", "PatientBirthDate", "OtherPatientIDs",
                        "StudyID", "PatientBirthName", "PatientMotherBirthName"):
            value = ds.get(keyword)
            if value:
                found.update(str(v) for v in (value if isinstance(value, list) else [value]))
        name = str(ds.get("PatientName") or "")
        if name:
            found.add(name)
            for part in name.replace("=", "^").split("^"):
                if len(part.strip()) >= 3:
                    found.add(part.strip())
        # short numbers (a StudyID "123") would match inside unrelated text: only values of
        # 3+ characters with a letter, or 5+ digits, are searched for
        return cls(str(ds.get("PatientID") or ""), frozenset(
            v for v in found if (len(v) >= 3 and not v.isdigit()) or len(v) >= 5))


class Pseudonyms:
    """Keyed pseudonyms, UIDs and date shifts of one export project."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        # UIDs this object made: the check walk leaves them (an original 2.25. UID, which
        # some devices make, is not in here and is replaced like any other)
        self.made: set[str] = set()

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        code = base64.b32encode(self._mac("patient", patient_id)[:10]).decode().rstrip("=")
        return PSEUDONYM_PREFIX + code

    def uid(self, uid: str) -> str:
        made = "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))
        self.made.add(made)
        return made

    def shift_days(self, patient_id: str) -> int:
        raw = int.from_bytes(self._mac("date-shift", patient_id)[:4], "big")
        return -(1 + raw % MAX_SHIFT_DAYS)


def _standard_uid(value: str) -> bool:
    """A UID of the standard itself (SOP class, transfer syntax, coding scheme, ...)."""
    return value in UID_dictionary


def deidentify(ds: Dataset, profile: Profile, pseudonyms: Pseudonyms) -> str:
    """De-identify ``ds`` in place under ``profile``; answer the patient's pseudonym."""
    from deid.dicom.parser import DicomParser

    _quiet_deid()
    who = Identity.of(ds)
    pseudonym = pseudonyms.patient(who.patient_id)
    shift = pseudonyms.shift_days(who.patient_id)

    def pseudo(**_: Any) -> str:
        return pseudonym

    def pseudo_uid(field: Any = None, **_: Any) -> str:
        value = str(field.element.value) if field is not None else ""
        return value if _standard_uid(value) else pseudonyms.uid(value)

    def date_shift(**_: Any) -> int:
        return shift

    parser = DicomParser(ds, recipe=profile.recipes())
    parser.define("pseudonym", pseudo)
    parser.define("pseudo_uid", pseudo_uid)
    parser.define("date_shift", date_shift)
    parser.parse(strip_sequences=False, remove_private=True)
    out: Dataset = parser.dicom
    _enforce(out, profile, pseudonyms, who, pseudonym)
    _label(out, profile, pseudonym)
    return pseudonym


def _enforce(ds: Dataset, profile: Profile, pseudonyms: Pseudonyms, who: Identity,
             pseudonym: str) -> None:
    """The check walk (module docstring): whatever the recipes left, nothing identifying
    stays. Dates: removed unless the modified-dates option shifted them (a date equal to
    an original one is then impossible to tell from a missed one, so the recipe's JITTER is
    trusted for DA/DT and the birth date is removed in any case)."""
    keep_dates = profile.has(MODIFIED_DATES)
    ds.pop("PatientBirthDate", None)
    ds.PatientBirthDate = ""  # Type 2 in the Patient Module: present, empty

    def visit(dataset: Dataset, top: bool) -> None:
        for elem in list(dataset):
            tag = elem.tag
            if tag.is_private:
                del dataset[tag]
                continue
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item, False)
                continue
            keyword = elem.keyword
            if top and keyword in ("PatientName", "PatientID"):
                elem.value = pseudonym
                continue
            if elem.VR == "PN" and elem.value:
                del dataset[tag]
            elif elem.VR == "UI" and elem.value:
                elem.value = _uids(elem.value, pseudonyms)
            elif elem.VR in _DATE_VRS and elem.value and not keep_dates:
                del dataset[tag]
            elif elem.VR in _TEXT_VRS and _mentions(elem, who.values):
                # E.3.11 Clean Descriptors: a kept description naming the patient goes
                del dataset[tag]
            elif elem.VR in ("OB", "UN") and tag.group in range(0x5000, 0x6100, 2):
                del dataset[tag]  # curves and overlays (E.3.x Clean Graphics not offered)

    visit(ds, True)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.pop("SourceApplicationEntityTitle", None)


def _uids(value: Any, pseudonyms: Pseudonyms) -> Any:
    def one(v: str) -> str:
        v = str(v)
        return v if _standard_uid(v) or v in pseudonyms.made else pseudonyms.uid(v)

    if isinstance(value, (list, tuple, MultiValue)):
        return [one(v) for v in value]
    return one(value)


def _mentions(elem: DataElement, values: Iterable[str]) -> bool:
    text = str(elem.value).upper()
    return any(v.upper() in text for v in values)


def _label(ds: Dataset, profile: Profile, pseudonym: str) -> None:
    """PS3.15 E.1.1: Patient Identity Removed, De-identification Method and its codes."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = profile.method
    items = []
    for value, meaning in (BASIC_CODE, *((OPTIONS[o].code_value, OPTIONS[o].meaning)
                                         for o in profile.options)):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.PatientName = ds.PatientID = pseudonym
    if profile.has(MODIFIED_DATES):
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"


# --- burned-in text --------------------------------------------------------------------

# Secondary capture SOP classes (PS3.4 B.5): screenshots and scanned documents, where the
# patient's name is often part of the pixels.
SECONDARY_CAPTURE = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
# Modalities whose images usually carry burned-in text (PS3.15 E.3.1 notes ultrasound and
# secondary captures; OT and XC: photographs and scans of documents).
BURNING_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "DOC"})


def burned_in_reason(ds: Dataset) -> str:
    """Why this object may show the patient's identity in its pixels ("" when no reason
    is known). The pixels are not cleaned (Clean Pixel Data is not offered): the user must
    confirm after a warning."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation is YES"
    if str(ds.get("SOPClassUID", "")) in SECONDARY_CAPTURE:
        return "secondary capture"
    modality = str(ds.get("Modality", "")).upper()
    if modality in BURNING_MODALITIES:
        return f"modality {modality} usually carries burned-in text"
    return ""


def shifted(date: str, days: int) -> str:
    """A DA value shifted by ``days`` (tests and the README's example)."""
    return (dt.datetime.strptime(date[:8], "%Y%m%d") + dt.timedelta(days=days)).strftime(
        "%Y%m%d")

