"""The query/retrieve hierarchy, written once: PATIENT > STUDY > SERIES > IMAGE.

Why one place: C-FIND, C-MOVE/C-GET, QIDO-RS and WADO-RS each encoded the levels, their
unique keys and which attributes belong where (four copies that could drift, issue 15).
Every layer above reads them from ``Level``. Members are ``str`` values equal to the
DICOM Query/Retrieve Level names, so they compare equal to ``"STUDY"`` and serialise as
such in audit records.
"""

from __future__ import annotations

import enum

# What each level's unique key is (PS3.4 C.6.1.1 / C.6.2.1), and how DICOMweb names it.
_UNIQUE = {
    "PATIENT": ("PatientID", "00100020", "patient"),
    "STUDY": ("StudyInstanceUID", "0020000D", "study"),
    "SERIES": ("SeriesInstanceUID", "0020000E", "series"),
    "IMAGE": ("SOPInstanceUID", "00080018", "instance"),
}

# Attributes of the patient, study and series levels, beyond the indexed ones: which part
# of a record's stored header belongs to its level (QIDO-RS ``includefield=all``).
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


class Level(enum.StrEnum):
    """A Query/Retrieve level, top (PATIENT) to bottom (IMAGE)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @classmethod
    def of(cls, text: str) -> Level | None:
        """The level a request names (any case, blanks ignored); None if none."""
        try:
            return cls(text.strip().upper())
        except ValueError:
            return None

    @property
    def rank(self) -> int:
        """0 for PATIENT ... 3 for IMAGE: a larger rank is a lower level."""
        return _ORDER.index(self)

    @property
    def unique_key(self) -> str:
        """The keyword of the level's unique key (``StudyInstanceUID``...)."""
        return _UNIQUE[self.value][0]

    @property
    def unique_tag(self) -> str:
        """The unique key's tag, as DICOM JSON writes it (``0020000D``)."""
        return _UNIQUE[self.value][1]

    @property
    def web_name(self) -> str:
        """How DICOMweb paths and messages name the level (``instance`` for IMAGE)."""
        return _UNIQUE[self.value][2]

    @property
    def parents(self) -> tuple[Level, ...]:
        """The levels above this one, top first."""
        return _ORDER[:self.rank]

    @property
    def path(self) -> tuple[Level, ...]:
        """The levels above this one and itself, top first."""
        return _ORDER[:self.rank + 1]

    def above(self, other: Level) -> bool:
        """True when this level is strictly above ``other`` (PATIENT above STUDY)."""
        return self.rank < other.rank

    def holds(self, tag: int) -> bool:
        """Whether an attribute of a record's stored header belongs to this level or one
        above it (IMAGE: everything but the file meta group)."""
        if self is Level.IMAGE:
            return (tag >> 16) != 0x0002
        allowed = (tag >> 16) == PATIENT_GROUP
        if self is Level.PATIENT:
            return allowed
        allowed = allowed or tag in STUDY_TAGS
        if self is Level.SERIES:
            allowed = allowed or tag in SERIES_TAGS
        return allowed


_ORDER: tuple[Level, ...] = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
