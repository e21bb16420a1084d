"""The de-identification profiles a user chooses from: PS3.15 Annex E's Basic Application
Level Confidentiality Profile plus named options, each recorded in the output.

Why named profiles and not free option flags: the options change what a recipient may do
with the data (dates shifted or not, device identity kept or not), so the user picks one
of a few reviewed combinations by name, the export records exactly which options it
applied (Deidentification Method and its code sequence, CID 7050), and the audit event
names the profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# CID 7050 "De-identification Method" codes (DCM scheme): (code value, code meaning), as
# pydicom's code dictionary has them (tests/test_deidentify_codes.py compares). Written
# out rather than read from ``pydicom.sr.codedict``: importing that dictionary costs every
# server process ~15 MB for these five lines (issue 17: peak RSS during ingest).
_BASIC = ("113100", "Basic Application Confidentiality Profile")
_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
_DEVICE_IDENTITY = ("113109", "Retain Device Identity Option")
_CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
BASIC = "basic"
MODIFIED_DATES = "modified-dates"
PATIENT_CHARACTERISTICS = "patient-characteristics"
DEVICE_IDENTITY = "device-identity"
CLEAN_DESCRIPTORS = "clean-descriptors"


@dataclass(frozen=True)
class Option:
    """One Annex E option: its recipe file and its CID 7050 code."""

    name: str
    recipe: str
    code_value: str
    meaning: str


OPTIONS: dict[str, Option] = {
    o.name: o for o in (
        Option(MODIFIED_DATES, "modified_dates.deid", *_MODIFIED_DATES),
        Option(PATIENT_CHARACTERISTICS, "retain_patient_characteristics.deid",
               *_PATIENT_CHARACTERISTICS),
        Option(DEVICE_IDENTITY, "retain_device_identity.deid", *_DEVICE_IDENTITY),
        Option(CLEAN_DESCRIPTORS, "clean_descriptors.deid", *_CLEAN_DESCRIPTORS),
    )
}
BASIC_CODE = _BASIC


@dataclass(frozen=True)
class Profile:
    """A named choice of options over the basic profile."""

    name: str
    options: tuple[str, ...]
    summary: str

    @property
    def method(self) -> list[str]:
        """Deidentification Method (0012,0063): LO, 1-n values of at most 64 characters:
        the profile, then one value per option."""
        return ["PS3.15 E.1 Basic Profile (pacsvault " + self.name + ")",
                *(OPTIONS[o].meaning[:64] for o in self.options)]

    def recipes(self) -> list[str]:
        """The recipe files, basic first (later files add KEEP/JITTER lines)."""
        return [recipe_path("basic.deid"),
                *(recipe_path(OPTIONS[o].recipe) for o in self.options)]

    def has(self, option: str) -> bool:
        return option in self.options


PROFILES: dict[str, Profile] = {
    p.name: p for p in (
        Profile(BASIC, (), "Annex E basic profile only: every date, description and device "
                "identifier removed"),
        Profile("research", (MODIFIED_DATES, PATIENT_CHARACTERISTICS, DEVICE_IDENTITY,
                             CLEAN_DESCRIPTORS),
                "basic + dates shifted per patient, sex/age/size/weight, device identity "
                "and cleaned descriptions kept"),
        Profile("teaching", (PATIENT_CHARACTERISTICS, CLEAN_DESCRIPTORS),
                "basic + sex/age/size/weight and cleaned descriptions kept; no dates"),
    )
}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown de-identification profile {name!r}; choose one of: "
                         + ", ".join(PROFILES)) from None


def recipe_path(name: str) -> str:
    """A shipped recipe file (package data, ``deidentify/recipes``)."""
    return str(Path(str(resources.files("pacsvault.deidentify") / "recipes" / name)))
