"""C-FIND matching table (PS3.4 C.2.2.2) against the real server, through pynetdicom.

A crafted set of patients is stored over the network (C-STORE from the registered node WS):
accented names in UTF-8 (ISO_IR 192) and Latin-1 (ISO_IR 100), names with ``^``
components, prefix and suffix, trailing empty components, an empty name, two studies of
one patient on the same day, studies at 23:30, 23:59, 00:00 and 00:30 (time ranges across
midnight), a study without a time, several modalities, a Request Attributes Sequence with
one and with two items. Each row of the table sends one C-FIND and checks that:

* the set of unique keys answered is exactly the expected set (no duplicates);
* every requested key comes back, with the value of the crafted dataset, attribute by
  attribute (counts and Modalities/SOP Classes in Study computed from what was stored);
* nothing that was not requested comes back.

Then: Specific Character Set in queries and answers, C-CANCEL of a streaming search, and
C-FIND answering from the index alone once every encrypted object has been moved away.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)
from pynetdicom import AE as ClientAE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.harness.backends import Backend
from tests.helpers import AE, Server, VaultDir, make_vault, start_server

LOCAL = "127.0.0.1"
CALLING = "WS"
STUDY_ROOT = "STUDY"
PATIENT_ROOT = "PATIENT"
MODELS = {
    STUDY_ROOT: StudyRootQueryRetrieveInformationModelFind,
    PATIENT_ROOT: PatientRootQueryRetrieveInformationModelFind,
}
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
CANCEL = 0xFE00
IDENTIFIER_MISMATCH = 0xA900
SOP_CLASSES = {"MR": MRImageStorage, "CT": CTImageStorage, "US": UltrasoundImageStorage}
RAS = "RequestAttributesSequence"

# --- the crafted archive ------------------------------------------------------------------


def uid(label: str) -> str:
    """A stable UID per label, so expected sets can be written as labels."""
    return str(generate_uid(entropy_srcs=["pacsvault test_cfind_matching", label]))


def uids(*labels: str) -> str:
    return "\\".join(uid(label) for label in labels)


@dataclass(frozen=True)
class Pat:
    pid: str
    name: str
    charset: str | None
    birth: str
    sex: str


@dataclass(frozen=True)
class Img:
    label: str
    number: int


@dataclass(frozen=True)
class Ser:
    label: str
    modality: str
    number: int
    images: tuple[Img, ...]
    requests: tuple[tuple[str, str], ...] = ()  # (RequestedProcedureID, SPS ID) items
    institution: str = "General Hospital"


@dataclass(frozen=True)
class Stu:
    label: str
    pid: str
    date: str
    time: str
    accession: str
    description: str
    referring: str
    study_id: str
    series: tuple[Ser, ...] = field(default_factory=tuple)


PATIENTS = {p.pid: p for p in [
    Pat("PV001", "Müller^Jürgen", "ISO_IR 192", "19600315", "M"),
    Pat("PV002", "Lefèvre^Hélène", "ISO_IR 100", "19750720", "F"),
    Pat("PV003", "MÜLLER^ANNA", "ISO_IR 192", "19821105", "F"),
    Pat("PV004", "Doe^John^Quincy^Dr.^Jr.", None, "19451201", "M"),
    Pat("PV005", "Doe^Jane", None, "19900101", "F"),
    Pat("PV006", "", None, "", "O"),
    Pat("PV007", "Wałęsa^Łukasz", "ISO_IR 192", "19431029", "M"),
    Pat("PV008", "Smith^Anne^^^", None, "19700101", "F"),
    Pat("PV009", "Andersen^Åse", "ISO_IR 100", "19850505", "F"),
]}

KLINIK = "Städtische Klinik Köln"
STUDIES = [
    Stu("S1a", "PV001", "20240110", "083000", "ACC1001", "MR KNEE LEFT", "Smith^John", "1001", (
        Ser("S1a-MR", "MR", 1, (Img("I1", 1), Img("I2", 2)), (("RP100", "SPS100"),), KLINIK),
        Ser("S1a-CT", "CT", 2, (Img("I3", 1),), (("RP100", "SPS100"),), KLINIK),
    )),
    Stu("S1b", "PV001", "20240110", "141500.5", "ACC1002", "CT HEAD", "Jones^Mary", "1002", (
        Ser("S1b-CT", "CT", 1, (Img("I4", 1),), (), KLINIK),
    )),
    Stu("S2", "PV002", "20240215", "233000", "ACC2001", "US ABDOMEN", "Dupré^Marc", "2001", (
        Ser("S2-US", "US", 1, (Img("I5", 1), Img("I6", 2)),
            (("RP200", "SPS200"), ("RP201", "SPS201")), "Hôpital Saint-Éloi"),
    )),
    Stu("S3", "PV003", "20240216", "003000", "ACC3001", "MR BRAIN", "", "3001", (
        Ser("S3-MR", "MR", 3, (Img("I7", 7),)),
    )),
    Stu("S4", "PV004", "20231231", "120000", "ACC4001", "CT CHEST", "Smith^John", "4001", (
        Ser("S4-CT", "CT", 1, (Img("I8", 1),)),
    )),
    Stu("S5", "PV005", "20240301", "100000", "ACC5001", "mr knee right", "Smith^Johnny",
        "5001", (Ser("S5-MR", "MR", 1, (Img("I9", 1),)),)),
    Stu("S6", "PV006", "20240401", "000000", "", "", "", "", (
        Ser("S6-US", "US", 1, (Img("I10", 1),)),
    )),
    Stu("S7", "PV007", "20240501", "091500", "ACC7001", "US THYROID", "", "7001", (
        Ser("S7-US", "US", 2, (Img("I11", 3),)),
    )),
    Stu("S8", "PV008", "20240110", "235900", "ACC8001", "CT ABDOMEN", "", "8001", (
        Ser("S8-CT", "CT", 1, (Img("I12", 1),)),
    )),
    Stu("S9", "PV009", "20221015", "", "ACC9001", "MR SPINE", "Smith^John", "9001", (
        Ser("S9-MR", "MR", 1, (Img("I13", 1),)),
    )),
]

ALL_PATIENTS = set(PATIENTS)
ALL_STUDIES = {s.label for s in STUDIES}
ALL_SERIES = {se.label for s in STUDIES for se in s.series}
ALL_IMAGES = {im.label for s in STUDIES for se in s.series for im in se.images}


def _image_dataset(p: Pat, st: Stu, se: Ser, im: Img) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[se.modality])
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid(im.label))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if p.charset:
        ds.SpecificCharacterSet = p.charset
    ds.SOPClassUID = SOP_CLASSES[se.modality]
    ds.SOPInstanceUID = uid(im.label)
    ds.StudyInstanceUID = uid(st.label)
    ds.SeriesInstanceUID = uid(se.label)
    ds.PatientName = p.name
    ds.PatientID = p.pid
    ds.PatientBirthDate = p.birth
    ds.PatientSex = p.sex
    ds.StudyDate = st.date
    ds.StudyTime = st.time
    ds.AccessionNumber = st.accession
    ds.StudyDescription = st.description
    ds.ReferringPhysicianName = st.referring
    ds.StudyID = st.study_id
    ds.Modality = se.modality
    ds.SeriesNumber = se.number
    ds.InstitutionName = se.institution
    ds.InstanceNumber = im.number
    if se.requests:
        items = []
        for rp, sps in se.requests:
            item = Dataset()
            item.RequestedProcedureID = rp
            item.ScheduledProcedureStepID = sps
            items.append(item)
        ds.RequestAttributesSequence = items
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    return ds


def crafted_datasets() -> list[Dataset]:
    return [
        _image_dataset(PATIENTS[st.pid], st, se, im)
        for st in STUDIES for se in st.series for im in se.images
    ]


# --- what every answer must say -----------------------------------------------------------

MULTI = {"ModalitiesInStudy", "SOPClassesInStudy"}
PATIENT_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"]
STUDY_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
              "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "InstitutionName", "NumberOfSeriesRelatedInstances"]
IMAGE_KEYS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
              "SOPClassUID", "InstanceNumber"]
RETURN_KEYS = {"PATIENT": PATIENT_KEYS, "STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS,
               "IMAGE": IMAGE_KEYS}
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
# What an answer may carry besides the requested keys (PS3.4 C.4.1.1.3.2).
ANSWER_EXTRAS = {"SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle"}

Value = str | frozenset[str] | tuple[dict[str, str], ...]


def _patient_record(p: Pat) -> dict[str, Value]:
    studies = [s for s in STUDIES if s.pid == p.pid]
    return {
        "PatientName": p.name, "PatientID": p.pid, "PatientBirthDate": p.birth,
        "PatientSex": p.sex,
        "NumberOfPatientRelatedStudies": str(len(studies)),
        "NumberOfPatientRelatedSeries": str(sum(len(s.series) for s in studies)),
        "NumberOfPatientRelatedInstances": str(
            sum(len(se.images) for s in studies for se in s.series)),
    }


def _study_record(st: Stu) -> dict[str, Value]:
    p = PATIENTS[st.pid]
    return {
        "PatientName": p.name, "PatientID": p.pid, "PatientBirthDate": p.birth,
        "PatientSex": p.sex,
        "StudyInstanceUID": uid(st.label), "StudyDate": st.date, "StudyTime": st.time,
        "AccessionNumber": st.accession, "StudyID": st.study_id,
        "StudyDescription": st.description, "ReferringPhysicianName": st.referring,
        "ModalitiesInStudy": frozenset(se.modality for se in st.series),
        "SOPClassesInStudy": frozenset(str(SOP_CLASSES[se.modality]) for se in st.series),
        "NumberOfStudyRelatedSeries": str(len(st.series)),
        "NumberOfStudyRelatedInstances": str(sum(len(se.images) for se in st.series)),
        # not a Study attribute: answered from the first instance the study received
        RAS: _requests(st.series[0]),
    }


def _series_record(st: Stu, se: Ser) -> dict[str, Value]:
    return {
        "PatientID": st.pid, "StudyInstanceUID": uid(st.label),
        "SeriesInstanceUID": uid(se.label), "Modality": se.modality,
        "SeriesNumber": str(se.number), "InstitutionName": se.institution,
        "NumberOfSeriesRelatedInstances": str(len(se.images)),
        RAS: _requests(se),
    }


def _requests(se: Ser) -> tuple[dict[str, str], ...]:
    return tuple({"RequestedProcedureID": rp, "ScheduledProcedureStepID": sps}
                 for rp, sps in se.requests)


def _image_record(st: Stu, se: Ser, im: Img) -> dict[str, Value]:
    return {
        "PatientID": st.pid, "StudyInstanceUID": uid(st.label),
        "SeriesInstanceUID": uid(se.label), "SOPInstanceUID": uid(im.label),
        "SOPClassUID": str(SOP_CLASSES[se.modality]), "InstanceNumber": str(im.number),
    }


# level -> unique key value -> (label, expected attributes)
RECORDS: dict[str, dict[str, tuple[str, dict[str, Value]]]] = {
    "PATIENT": {p.pid: (p.pid, _patient_record(p)) for p in PATIENTS.values()},
    "STUDY": {uid(st.label): (st.label, _study_record(st)) for st in STUDIES},
    "SERIES": {uid(se.label): (se.label, _series_record(st, se))
               for st in STUDIES for se in st.series},
    "IMAGE": {uid(im.label): (im.label, _image_record(st, se, im))
              for st in STUDIES for se in st.series for im in se.images},
}


def answer_value(ds: Dataset, keyword: str) -> Value:
    value = ds[keyword].value
    if keyword in MULTI:
        if value is None or value == "":
            return frozenset()
        if isinstance(value, MultiValue | list):
            return frozenset(str(v) for v in value)
        return frozenset([str(value)])
    if value is None:
        return ""
    return str(value)


def sequence_items(ds: Dataset, keyword: str) -> list[dict[str, str]]:
    return [{e.keyword: "" if e.value is None else str(e.value) for e in item}
            for item in ds[keyword].value or []]


# --- network helpers ----------------------------------------------------------------------


def associate(port: int, *contexts: str) -> Association:
    ae = ClientAE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate(LOCAL, port, ae_title=AE)
    assert assoc.is_established, "association with the archive refused"
    return assoc


def store(port: int, datasets: Sequence[Dataset]) -> None:
    ae = ClientAE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in SOP_CLASSES.values():
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(LOCAL, port, ae_title=AE)
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == SUCCESS, status
    finally:
        assoc.release()


def cfind(port: int, root: str, identifier: Dataset) -> tuple[list[Dataset], int]:
    """All pending identifiers and the final status of one C-FIND."""
    assoc = associate(port, MODELS[root])
    answers: list[Dataset] = []
    final: int | None = None
    try:
        for status, ds in assoc.send_c_find(identifier, MODELS[root]):
            assert status, "no response (association aborted or DIMSE timeout)"
            if status.Status in PENDING:
                assert ds is not None
                answers.append(ds)
            else:
                final = int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
    assert final is not None
    return answers, final


Keys = Mapping[str, Any]


def build_identifier(level: str, keys: Keys, *, return_keys: bool = True) -> Dataset:
    ds = Dataset()
    if "SpecificCharacterSet" in keys:
        ds.SpecificCharacterSet = keys["SpecificCharacterSet"]
    ds.QueryRetrieveLevel = level
    if return_keys:
        for keyword in RETURN_KEYS[level]:
            setattr(ds, keyword, "")
    for keyword, value in keys.items():
        if keyword == "SpecificCharacterSet":
            continue
        if keyword == RAS:
            items = []
            for spec in value:
                item = Dataset()
                for sub, sub_value in spec.items():
                    setattr(item, sub, sub_value)
                items.append(item)
            ds.RequestAttributesSequence = items
        else:
            setattr(ds, keyword, value)
    return ds


def check_answers(
    answers: list[Dataset], level: str, identifier: Dataset, expected: set[str]
) -> None:
    """Exact set of unique keys, then every requested attribute, one by one."""
    unique = UNIQUE[level]
    got = [str(a[unique].value) for a in answers]
    labels = sorted(RECORDS[level][u][0] if u in RECORDS[level] else f"?{u}" for u in got)
    assert len(got) == len(set(got)), f"duplicate answers: {labels}"
    assert set(labels) == expected, (
        f"missing {sorted(expected - set(labels))}, unexpected {sorted(set(labels) - expected)}"
    )
    requested = {e.keyword for e in identifier} - {"SpecificCharacterSet", "QueryRetrieveLevel"}
    for answer in answers:
        label, record = RECORDS[level][str(answer[unique].value)]
        assert answer.QueryRetrieveLevel == level
        assert answer.RetrieveAETitle == AE
        present = {e.keyword for e in answer}
        assert requested <= present, f"{label}: keys not returned {requested - present}"
        assert present - requested - ANSWER_EXTRAS == set(), f"{label}: unrequested keys"
        for keyword in sorted(requested - {RAS}):
            # an attribute the crafted data never had must come back empty
            assert answer_value(answer, keyword) == record.get(keyword, ""), f"{label}: {keyword}"
        if RAS in requested:
            _check_sequence(answer, identifier, record, label)


def _check_sequence(
    answer: Dataset, identifier: Dataset, record: dict[str, Value], label: str
) -> None:
    stored = list(cast(list[dict[str, Any]], record[RAS]))
    returned = sequence_items(answer, RAS)
    query_items = identifier[RAS].value
    if not query_items:  # zero-length sequence: the whole stored sequence is returned
        assert returned == stored, label
        return
    wanted = {e.keyword for e in query_items[0]}
    projected = [{k: item.get(k, "") for k in sorted(wanted)} for item in stored]
    assert returned, f"{label}: a matching sequence came back empty"
    for item in returned:
        assert set(item) == wanted, f"{label}: item keys {set(item)} != requested {wanted}"
        assert item in projected, f"{label}: item {item} not stored"


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class Env:
    vault: VaultDir
    server: Server


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Env]:
    """The crafted corpus in a served vault, once per index backend (issue 16: the same
    matching table on the embedded index and on sealed PostgreSQL)."""
    vault = backend.make_vault(tmp_path_factory.mktemp("cfind") / "vault")
    vault.add_node(CALLING, "--roles", "store,query,retrieve")
    server = start_server(vault)
    try:
        store(server.port, crafted_datasets())
        yield Env(vault, server)
    finally:
        server.stop()


# --- the matching table --------------------------------------------------------------------

UTF8 = {"SpecificCharacterSet": "ISO_IR 192"}
LATIN1 = {"SpecificCharacterSet": "ISO_IR 100"}
P1_STUDIES = {"S1a", "S1b"}
MUELLER = {"S1a", "S1b", "S3"}


def row(rid: str, level: str, keys: Keys, expected: set[str], root: str = STUDY_ROOT) -> Any:
    """One line of the table: the C-FIND keys and the labels that must answer."""
    return pytest.param(root, level, dict(keys), expected, id=rid)


TABLE = [
    # universal matching (C.2.2.2.3): zero-length keys return everything, empty values too
    row("study-universal", "STUDY", {}, ALL_STUDIES),
    row("patient-universal", "PATIENT", {}, ALL_PATIENTS, PATIENT_ROOT),
    row("series-universal", "SERIES", {}, ALL_SERIES),
    row("image-universal", "IMAGE", {}, ALL_IMAGES),
    row("name-star-is-universal", "STUDY", {"PatientName": "*"}, ALL_STUDIES),
    # single value matching (C.2.2.2.1); person names case-insensitive (documented choice)
    row("name-single-utf8", "STUDY", {**UTF8, "PatientName": "Müller^Jürgen"}, P1_STUDIES),
    row("name-single-lowercase", "STUDY", {**UTF8, "PatientName": "müller^jürgen"},
        P1_STUDIES),
    row("name-single-uppercase", "STUDY", {**UTF8, "PatientName": "MÜLLER^JÜRGEN"},
        P1_STUDIES),
    row("name-single-latin1-lowercase", "STUDY", {**LATIN1, "PatientName": "lefèvre^hélène"},
        {"S2"}),
    row("name-all-five-components", "STUDY", {"PatientName": "Doe^John^Quincy^Dr.^Jr."},
        {"S4"}),
    row("name-single-is-not-prefix", "STUDY", {"PatientName": "Doe^John"}, set()),
    row("name-trailing-empty-components", "STUDY", {"PatientName": "smith^anne"}, {"S8"}),
    row("name-trailing-carets-in-query", "STUDY", {"PatientName": "SMITH^ANNE^^^"}, {"S8"}),
    # wildcard matching (C.2.2.2.4)
    row("name-prefix-accent-lower", "STUDY", {**UTF8, "PatientName": "müller*"}, MUELLER),
    row("name-prefix-accent-upper", "STUDY", {**UTF8, "PatientName": "MÜLLER*"}, MUELLER),
    row("name-qmark-on-accent", "STUDY", {"PatientName": "M?LLER^*"}, MUELLER),
    row("name-infix", "STUDY", {**UTF8, "PatientName": "*ller^j*"}, P1_STUDIES),
    row("name-component-prefix", "STUDY", {"PatientName": "Doe^*"}, {"S4", "S5"}),
    row("name-qmark-in-component", "STUDY", {"PatientName": "doe^j?n*"}, {"S5"}),
    row("name-suffix-non-latin1", "STUDY", {**UTF8, "PatientName": "*łukasz"}, {"S7"}),
    row("name-A-star-skips-empty-name", "STUDY", {"PatientName": "A*"}, {"S9"}),
    row("name-a-star-lowercase", "STUDY", {"PatientName": "a*"}, {"S9"}),
    row("name-suffix-latin1", "STUDY", {**LATIN1, "PatientName": "*^åse"}, {"S9"}),
    row("patient-id-single", "STUDY", {"PatientID": "PV001"}, P1_STUDIES),
    row("patient-id-qmark", "STUDY", {"PatientID": "PV00?"}, ALL_STUDIES),
    row("accession-single", "STUDY", {"AccessionNumber": "ACC1001"}, {"S1a"}),
    row("accession-case-sensitive", "STUDY", {"AccessionNumber": "acc1001"}, set()),
    row("accession-qmark-suffix", "STUDY", {"AccessionNumber": "ACC100?"}, P1_STUDIES),
    row("accession-qmark-infix", "STUDY", {"AccessionNumber": "ACC?001"},
        ALL_STUDIES - {"S1b", "S6"}),
    row("accession-star-prefix", "STUDY", {"AccessionNumber": "*2001"}, {"S2"}),
    row("description-prefix-case-sensitive", "STUDY", {"StudyDescription": "MR*"},
        {"S1a", "S3", "S9"}),
    row("description-lowercase", "STUDY", {"StudyDescription": "mr*"}, {"S5"}),
    row("description-infix", "STUDY", {"StudyDescription": "*KNEE*"}, {"S1a"}),
    row("description-qmark", "STUDY", {"StudyDescription": "CT ?EAD"}, {"S1b"}),
    row("referring-single-ci", "STUDY", {"ReferringPhysicianName": "smith^john"},
        {"S1a", "S4", "S9"}),
    row("referring-prefix", "STUDY", {"ReferringPhysicianName": "SMITH^JOHN*"},
        {"S1a", "S4", "S5", "S9"}),
    row("referring-accent-latin1-stored", "STUDY",
        {**UTF8, "ReferringPhysicianName": "dupré^marc"}, {"S2"}),
    row("sex-single", "STUDY", {"PatientSex": "F"}, {"S2", "S3", "S5", "S8", "S9"}),
    # date ranges (C.2.2.2.5)
    row("date-single", "STUDY", {"StudyDate": "20240110"}, {"S1a", "S1b", "S8"}),
    row("date-from", "STUDY", {"StudyDate": "20240101-"},
        ALL_STUDIES - {"S4", "S9"}),
    row("date-until", "STUDY", {"StudyDate": "-20231231"}, {"S4", "S9"}),
    row("date-between", "STUDY", {"StudyDate": "20240215-20240401"},
        {"S2", "S3", "S5", "S6"}),
    row("date-between-one-day", "STUDY", {"StudyDate": "20240110-20240110"},
        {"S1a", "S1b", "S8"}),
    row("same-patient-same-day", "STUDY", {"PatientID": "PV001", "StudyDate": "20240110"},
        P1_STUDIES),
    row("same-day-told-apart-by-time", "STUDY",
        {"PatientID": "PV001", "StudyDate": "20240110", "StudyTime": "1200-"}, {"S1b"}),
    # time ranges, including across midnight; a study without a time never matches a range
    row("time-single-minute", "STUDY", {"StudyTime": "0830"}, {"S1a"}),
    row("time-single-fraction-stored", "STUDY", {"StudyTime": "141500"}, {"S1b"}),
    row("time-between", "STUDY", {"StudyTime": "0800-1200"}, {"S1a", "S4", "S5", "S7"}),
    row("time-from", "STUDY", {"StudyTime": "1400-"}, {"S1b", "S2", "S8"}),
    row("time-until", "STUDY", {"StudyTime": "-0100"}, {"S3", "S6"}),
    row("time-across-midnight", "STUDY", {"StudyTime": "2300-0100"},
        {"S2", "S3", "S6", "S8"}),
    row("time-across-midnight-narrow", "STUDY", {"StudyTime": "2359-0001"}, {"S6", "S8"}),
    row("night-shift-dates-and-times", "STUDY",
        {"StudyDate": "20240215-20240216", "StudyTime": "2300-0100"}, {"S2", "S3"}),
    row("birth-date-range-study-level", "STUDY", {"PatientBirthDate": "19600101-19801231"},
        {"S1a", "S1b", "S2", "S8"}),
    # list of UID matching (C.2.2.2.2)
    row("study-uid-single", "STUDY", {"StudyInstanceUID": uid("S3")}, {"S3"}),
    row("study-uid-list", "STUDY", {"StudyInstanceUID": uids("S1a", "S4", "S7")},
        {"S1a", "S4", "S7"}),
    row("study-uid-list-with-unknown", "STUDY",
        {"StudyInstanceUID": uids("S2") + "\\1.2.826.0.1.3680043.8.498.999"}, {"S2"}),
    row("modalities-in-study", "STUDY", {"ModalitiesInStudy": "CT"},
        {"S1a", "S1b", "S4", "S8"}),
    row("modalities-in-study-list", "STUDY", {"ModalitiesInStudy": "MR\\US"},
        {"S1a", "S3", "S5", "S9", "S2", "S6", "S7"}),
    # sequence matching (C.2.2.2.6)
    row("sequence-study-level", "STUDY", {RAS: [{"RequestedProcedureID": "RP200"}]}, {"S2"}),
    row("sequence-second-item", "SERIES",
        {RAS: [{"RequestedProcedureID": "", "ScheduledProcedureStepID": "SPS201"}]},
        {"S2-US"}),
    row("sequence-wildcard-item-key", "SERIES",
        {RAS: [{"RequestedProcedureID": "RP10*", "ScheduledProcedureStepID": ""}]},
        {"S1a-MR", "S1a-CT"}),
    row("sequence-keys-from-one-item", "SERIES",
        {RAS: [{"RequestedProcedureID": "RP201", "ScheduledProcedureStepID": "SPS201"}]},
        {"S2-US"}),
    row("sequence-keys-from-different-items", "SERIES",
        {RAS: [{"RequestedProcedureID": "RP200", "ScheduledProcedureStepID": "SPS201"}]},
        set()),
    row("sequence-all-items-match", "SERIES",
        {RAS: [{"RequestedProcedureID": "RP20?", "ScheduledProcedureStepID": ""}]},
        {"S2-US"}),
    row("sequence-zero-items-universal", "SERIES", {RAS: []}, ALL_SERIES),
    # series level
    row("series-modality", "SERIES", {"Modality": "CT"},
        {"S1a-CT", "S1b-CT", "S4-CT", "S8-CT"}),
    row("series-modality-in-study", "SERIES",
        {"StudyInstanceUID": uid("S1a"), "Modality": "MR"}, {"S1a-MR"}),
    row("series-number-2", "SERIES", {"SeriesNumber": "2"}, {"S1a-CT", "S7-US"}),
    row("series-number-3", "SERIES", {"SeriesNumber": "3"}, {"S3-MR"}),
    row("series-uid-list", "SERIES", {"SeriesInstanceUID": uids("S2-US", "S7-US")},
        {"S2-US", "S7-US"}),
    row("series-stored-only-attribute-utf8", "SERIES",
        {**UTF8, "InstitutionName": "*Klinik*"}, {"S1a-MR", "S1a-CT", "S1b-CT"}),
    row("series-stored-only-attribute-case", "SERIES", {"InstitutionName": "*klinik*"}, set()),
    row("series-stored-only-attribute-latin1", "SERIES",
        {**LATIN1, "InstitutionName": "Hôpital*"}, {"S2-US"}),
    # image level
    row("image-sop-uid", "IMAGE", {"SOPInstanceUID": uid("I3")}, {"I3"}),
    row("image-sop-uid-list", "IMAGE", {"SOPInstanceUID": uids("I1", "I5", "I13")},
        {"I1", "I5", "I13"}),
    row("image-instance-number-2", "IMAGE", {"InstanceNumber": "2"}, {"I2", "I6"}),
    row("image-instance-number-7", "IMAGE", {"InstanceNumber": "7"}, {"I7"}),
    row("image-in-series", "IMAGE",
        {"StudyInstanceUID": uid("S1a"), "SeriesInstanceUID": uid("S1a-MR")}, {"I1", "I2"}),
    row("image-sop-class", "IMAGE", {"SOPClassUID": str(CTImageStorage)},
        {"I3", "I4", "I8", "I12"}),
    # patient root
    row("patient-id", "PATIENT", {"PatientID": "PV001"}, {"PV001"}, PATIENT_ROOT),
    row("patient-name-ci", "PATIENT", {**UTF8, "PatientName": "müller*"}, {"PV001", "PV003"},
        PATIENT_ROOT),
    row("patient-name-A-star", "PATIENT", {"PatientName": "A*"}, {"PV009"}, PATIENT_ROOT),
    row("patient-empty-name-in-universal", "PATIENT", {"PatientName": ""}, ALL_PATIENTS,
        PATIENT_ROOT),
    row("patient-birth-range", "PATIENT", {"PatientBirthDate": "19600101-19801231"},
        {"PV001", "PV002", "PV008"}, PATIENT_ROOT),
    row("patient-birth-until", "PATIENT", {"PatientBirthDate": "-19500101"},
        {"PV004", "PV007"}, PATIENT_ROOT),
    row("patient-birth-single", "PATIENT", {"PatientBirthDate": "19900101"}, {"PV005"},
        PATIENT_ROOT),
    row("patient-root-study", "STUDY", {"PatientID": "PV001"}, P1_STUDIES, PATIENT_ROOT),
    row("patient-root-series", "SERIES", {"PatientID": "PV002", "StudyInstanceUID": uid("S2")},
        {"S2-US"}, PATIENT_ROOT),
    row("patient-root-image", "IMAGE",
        {"PatientID": "PV001", "StudyInstanceUID": uid("S1a"),
         "SeriesInstanceUID": uid("S1a-CT")}, {"I3"}, PATIENT_ROOT),
]


@pytest.mark.parametrize(("root", "level", "keys", "expected"), TABLE)
def test_matching_table(
    env: Env, root: str, level: str, keys: dict[str, Any], expected: set[str]
) -> None:
    identifier = build_identifier(level, keys)
    answers, final = cfind(env.server.port, root, identifier)
    assert final == SUCCESS
    check_answers(answers, level, identifier, expected)


def test_study_root_has_no_patient_level(env: Env) -> None:
    answers, final = cfind(env.server.port, STUDY_ROOT, build_identifier("PATIENT", {}))
    assert (answers, final) == ([], IDENTIFIER_MISMATCH)


def test_unknown_return_key_comes_back_empty(env: Env) -> None:
    identifier = build_identifier("STUDY", {"AccessionNumber": "ACC1001"})
    identifier.PatientComments = ""
    identifier.OtherPatientNames = ""
    answers, final = cfind(env.server.port, STUDY_ROOT, identifier)
    assert final == SUCCESS
    check_answers(answers, "STUDY", identifier, {"S1a"})
    assert answers[0]["PatientComments"].is_empty
    assert answers[0]["OtherPatientNames"].is_empty


# --- sequence matching: what the response items contain ---------------------------------


@pytest.mark.parametrize(("item", "expected"), [
    ({"RequestedProcedureID": "", "ScheduledProcedureStepID": "SPS201"},
     [{"RequestedProcedureID": "RP201", "ScheduledProcedureStepID": "SPS201"}]),
    ({"RequestedProcedureID": "RP200"}, [{"RequestedProcedureID": "RP200"}]),
])
def test_sequence_answer_holds_only_matching_items(
    env: Env, item: dict[str, str], expected: list[dict[str, str]]
) -> None:
    identifier = build_identifier("SERIES", {RAS: [item]})
    answers, final = cfind(env.server.port, STUDY_ROOT, identifier)
    assert final == SUCCESS
    assert [RECORDS["SERIES"][str(a.SeriesInstanceUID)][0] for a in answers] == ["S2-US"]
    assert sequence_items(answers[0], RAS) == expected


def test_sequence_with_one_empty_item_returns_whole_sequence(env: Env) -> None:
    identifier = build_identifier("SERIES", {RAS: [{}]})
    answers, final = cfind(env.server.port, STUDY_ROOT, identifier)
    assert final == SUCCESS
    by_label = {RECORDS["SERIES"][str(a.SeriesInstanceUID)][0]: a for a in answers}
    assert set(by_label) == ALL_SERIES
    for label, answer in by_label.items():
        record = RECORDS["SERIES"][uid(label)][1]
        assert sequence_items(answer, RAS) == list(cast(list[Any], record[RAS])), label


# --- patient counts at study level (Study Root, Table C.6-5) -----------------------------


def test_patient_counts_at_study_level(env: Env) -> None:
    identifier = build_identifier("STUDY", {})
    for keyword in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances"):
        setattr(identifier, keyword, "")
    answers, final = cfind(env.server.port, STUDY_ROOT, identifier)
    assert final == SUCCESS
    assert len(answers) == len(STUDIES)
    for answer in answers:
        label, _ = RECORDS["STUDY"][str(answer.StudyInstanceUID)]
        patient = _patient_record(PATIENTS[str(answer.PatientID)])
        for keyword in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                        "NumberOfPatientRelatedInstances"):
            assert answer_value(answer, keyword) == patient[keyword], f"{label}: {keyword}"


# --- Specific Character Set ----------------------------------------------------------------


@pytest.fixture
def raw_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep answers undecoded until read: pynetdicom's identifier logging decodes them."""
    monkeypatch.setattr(pynetdicom_config, "LOG_RESPONSE_IDENTIFIERS", False)


def _raw_name(answer: Dataset) -> bytes:
    """PatientName as it travelled (call before anything reads the decoded value)."""
    raw = answer.get_item(0x00100010)
    assert raw is not None
    value = raw.value
    if not value:  # a zero-length value has nothing to decode
        return b""
    assert isinstance(value, bytes)
    return value.rstrip(b" ")


def test_utf8_query_and_answer(env: Env, raw_answers: None) -> None:
    identifier = build_identifier("PATIENT", {**UTF8, "PatientName": "Müller^Jürgen"})
    answers, final = cfind(env.server.port, PATIENT_ROOT, identifier)
    assert final == SUCCESS
    raw = [_raw_name(a) for a in answers]
    check_answers(answers, "PATIENT", identifier, {"PV001"})
    (answer,) = answers
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert raw == ["Müller^Jürgen".encode()]
    assert str(answer.PatientName) == "Müller^Jürgen"


def test_latin1_query_gets_latin1_answer(env: Env, raw_answers: None) -> None:
    identifier = build_identifier("PATIENT", {**LATIN1, "PatientName": "Lefèvre^Hélène"})
    assert b"Lef\xe8vre^H\xe9l\xe8ne" in _encoded(identifier)
    answers, final = cfind(env.server.port, PATIENT_ROOT, identifier)
    assert final == SUCCESS
    raw = [_raw_name(a) for a in answers]
    check_answers(answers, "PATIENT", identifier, {"PV002"})
    (answer,) = answers
    assert answer.SpecificCharacterSet == "ISO_IR 100"
    assert raw == ["Lefèvre^Hélène".encode("latin-1")]
    assert str(answer.PatientName) == "Lefèvre^Hélène"


def test_latin1_query_matches_name_stored_in_utf8(env: Env, raw_answers: None) -> None:
    identifier = build_identifier("PATIENT", {**LATIN1, "PatientName": "müller^jürgen"})
    answers, final = cfind(env.server.port, PATIENT_ROOT, identifier)
    assert final == SUCCESS
    raw = [_raw_name(a) for a in answers]
    check_answers(answers, "PATIENT", identifier, {"PV001"})
    assert answers[0].SpecificCharacterSet == "ISO_IR 100"  # Müller^Jürgen fits Latin-1
    assert raw == ["Müller^Jürgen".encode("latin-1")]


def test_latin1_query_answers_in_utf8_what_latin1_cannot_hold(env: Env, raw_answers: None) -> None:
    identifier = build_identifier("PATIENT", {**LATIN1, "PatientName": "*"})
    answers, final = cfind(env.server.port, PATIENT_ROOT, identifier)
    assert final == SUCCESS
    raw = [_raw_name(a) for a in answers]
    check_answers(answers, "PATIENT", identifier, ALL_PATIENTS)
    charsets = set()
    for answer, raw_name in zip(answers, raw, strict=True):
        name = PATIENTS[str(answer.PatientID)].name
        fits = all(ord(c) < 256 for c in name)
        charsets.add(answer.SpecificCharacterSet)
        assert answer.SpecificCharacterSet == ("ISO_IR 100" if fits else "ISO_IR 192"), name
        assert raw_name == name.encode("latin-1" if fits else "utf-8")
    assert charsets == {"ISO_IR 100", "ISO_IR 192"}


def test_query_without_charset_is_answered_in_utf8(env: Env, raw_answers: None) -> None:
    identifier = build_identifier("PATIENT", {"PatientID": "PV009"})
    answers, final = cfind(env.server.port, PATIENT_ROOT, identifier)
    assert final == SUCCESS
    raw = [_raw_name(a) for a in answers]
    check_answers(answers, "PATIENT", identifier, {"PV009"})
    assert answers[0].SpecificCharacterSet == "ISO_IR 192"
    assert raw == ["Andersen^Åse".encode()]


def _encoded(ds: Dataset) -> bytes:
    from pynetdicom.dsutils import encode

    data = encode(ds, True, True)
    assert data is not None
    return data


# --- streaming and C-CANCEL ------------------------------------------------------------------

BULK = 200


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second archive holding many tiny studies of one patient."""
    vault = make_vault(tmp_path_factory.mktemp("cfind-bulk") / "vault")
    vault.add_node(CALLING, "--roles", "store,query,retrieve")
    server = start_server(vault)
    try:
        patient = Pat("BULK01", "Bulk^Patient", None, "19700101", "M")
        datasets = []
        for i in range(BULK):
            image = Img(f"B{i}", 1)
            series = Ser(f"BS{i}", "CT", 1, (image,))
            study = Stu(f"BT{i}", patient.pid, "20240601", f"{i % 24:02d}0000", f"B{i}",
                        "BULK", "", str(i), (series,))
            datasets.append(_image_dataset(patient, study, series, image))
        # four associations at once: storing is bound by fsync, not by the CPU
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda k: store(server.port, datasets[k::4]), range(4)))
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_bulk_search_returns_everything(bulk: Server) -> None:
    answers, final = cfind(bulk.port, STUDY_ROOT,
                           build_identifier("STUDY", {"PatientID": "BULK01"}))
    assert final == SUCCESS
    assert len({str(a.StudyInstanceUID) for a in answers}) == BULK


@pytest.mark.slow
def test_c_cancel_stops_the_search(bulk: Server) -> None:
    model = MODELS[STUDY_ROOT]
    assoc = associate(bulk.port, model)
    msg_id = 7
    pending = 0
    finals: list[int] = []
    try:
        for status, ds in assoc.send_c_find(
            build_identifier("STUDY", {"PatientID": "BULK01"}), model, msg_id=msg_id
        ):
            assert status, "no response (association aborted or DIMSE timeout)"
            if status.Status in PENDING:
                assert ds is not None
                pending += 1
                if pending == 1:  # the first match streamed in: cancel the rest
                    assoc.send_c_cancel(msg_id, query_model=model)
            else:
                finals.append(int(status.Status))
        # the association is still usable after a cancelled search
        answers, final = cfind_on(assoc, model, build_identifier("STUDY", {"StudyID": "3"}))
        assert final == SUCCESS and len(answers) == 1
    finally:
        if assoc.is_established:
            assoc.release()
    assert finals == [CANCEL]
    assert 1 <= pending < BULK, f"all {BULK} answers arrived despite the C-CANCEL"


def cfind_on(assoc: Association, model: str, identifier: Dataset) -> tuple[list[Dataset], int]:
    answers: list[Dataset] = []
    final = -1
    for status, ds in assoc.send_c_find(identifier, model, msg_id=8):
        assert status
        if status.Status in PENDING:
            assert ds is not None
            answers.append(ds)
        else:
            final = int(status.Status)
    return answers, final


# --- C-FIND never opens an image ----------------------------------------------------------


def test_cfind_answers_from_the_index_alone(env: Env) -> None:
    """Every encrypted object is moved away while the server runs; C-FIND still answers
    every level completely, values included. Objects are put back afterwards."""
    objects = env.vault.data / "objects"
    parked = env.vault.root / "parked-objects"
    parked.mkdir()
    moved: list[Path] = []
    try:
        for entry in objects.iterdir():
            if entry.name == ".tmp":
                continue
            target = parked / entry.name
            shutil.move(entry, target)
            moved.append(target)
        assert moved, "no object files found to move away"
        assert not list(objects.rglob("*.pvo"))
        for root, level, expected in [
            (PATIENT_ROOT, "PATIENT", ALL_PATIENTS),
            (STUDY_ROOT, "STUDY", ALL_STUDIES),
            (STUDY_ROOT, "SERIES", ALL_SERIES),
            (STUDY_ROOT, "IMAGE", ALL_IMAGES),
        ]:
            identifier = build_identifier(level, {RAS: []} if level == "SERIES" else {})
            answers, final = cfind(env.server.port, root, identifier)
            assert final == SUCCESS
            check_answers(answers, level, identifier, expected)
        assert env.server.alive()
    finally:
        for target in moved:
            shutil.move(target, objects / target.name)
