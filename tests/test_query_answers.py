"""Answers are built from DICOM JSON without ``Dataset.from_json``: they must not differ."""

from __future__ import annotations

from typing import Any, cast

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pacsvault.index.query import json_to_dataset

ENTRIES: list[dict[str, Any]] = [
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DUPONT^Jean"}]}},
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou",
                                         "Ideographic": "山田^太郎",
                                         "Phonetic": "やまだ^たろう"}]}},
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}, {"Alphabetic": "C^D"}]}},
    {"00100010": {"vr": "PN"}},
    {"00080061": {"vr": "CS", "Value": ["CT", "MR"]}},
    {"00080061": {"vr": "CS", "Value": []}},
    {"00080020": {"vr": "DA", "Value": ["20230306"]}},
    {"00080030": {"vr": "TM"}},
    {"00201206": {"vr": "IS", "Value": [3]}},
    {"00201208": {"vr": "IS", "Value": [1, 2]}},
    {"00280030": {"vr": "DS", "Value": [0.5, 0.661468]}},
    {"00180050": {"vr": "DS", "Value": [5]}},
    {"00280010": {"vr": "US", "Value": [512]}},
    {"00189219": {"vr": "FD", "Value": [1.5]}},
    {"00081030": {"vr": "LO", "Value": ["Scanner de l'abdomen é"]}},
    {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}},
    {"00081110": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.3"]}}]}},
    {"00081110": {"vr": "SQ"}},
    {"00200037": {"vr": "DS", "Value": [1, 0, 0, 0, 1, 0]}},
    {"00091001": {"vr": "OB", "InlineBinary": "AAEC"}},
    {"00100020": {"vr": "LO", "Value": [None, "x"]}},
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: next(iter(e.values()))["vr"])
def test_same_dataset_as_from_json(entry: dict[str, Any]) -> None:
    assert json_to_dataset(entry) == Dataset.from_json(entry)


def test_whole_real_header_round_trips() -> None:
    ds = dcmread(cast(str, get_testdata_file("CT_small.dcm")), stop_before_pixels=True)
    meta = ds.to_json_dict(bulk_data_threshold=1024,
                           bulk_data_element_handler=lambda _e: "x",
                           suppress_invalid_tags=True)
    meta = {k: v for k, v in meta.items() if "BulkDataURI" not in v}
    assert json_to_dataset(meta) == Dataset.from_json(meta)


def _answers() -> list[dict[str, Any]]:
    base = {
        "00080052": {"vr": "CS", "Value": ["STUDY"]},
        "00080054": {"vr": "AE", "Value": ["PACSVAULT"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.4242.1"]},
        "00080020": {"vr": "DA", "Value": ["20230306"]},
        "00080030": {"vr": "TM", "Value": ["101112.123"]},
        "00080050": {"vr": "SH"},
        "00201206": {"vr": "IS", "Value": [3]},
        "00201208": {"vr": "IS", "Value": [150]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
        "00100030": {"vr": "DA", "Value": ["19500505"]},
        "00100040": {"vr": "CS", "Value": ["F"]},
        "00280010": {"vr": "US", "Value": [512]},
    }
    out = []
    for charset in ("ISO_IR 192", "ISO_IR 100", None):
        for entry in ENTRIES:
            answer = {**base, **entry}
            if charset:
                answer["00080005"] = {"vr": "CS", "Value": [charset]}
            out.append(answer)
        latin = {**base, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "LEFÈVRE^Hélène"}]},
                 "00081030": {"vr": "LO", "Value": ["Thorax été"]}}
        if charset:
            latin["00080005"] = {"vr": "CS", "Value": [charset]}
        out.append(latin)
    return out


@pytest.mark.parametrize("implicit", [True, False])
def test_encoded_answers_are_pydicoms_bytes(implicit: bool) -> None:
    from pynetdicom.dsutils import encode

    from pacsvault.dicom.answers import Answer, encode_answer, install

    install()
    from pynetdicom import service_class

    for answer in _answers():
        expected = encode(Dataset.from_json(answer), implicit, True, False)
        assert encode_answer(answer, implicit) == expected, answer
        # through the hook pynetdicom's C-FIND SCP calls
        hooked = service_class.encode  # type: ignore[attr-defined]
        assert hooked(Answer(answer), implicit, True, False) == expected
        assert hooked(Answer(answer), False, False, False) == encode(
            Dataset.from_json(answer), False, False, False)
