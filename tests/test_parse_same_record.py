"""Issue 17, less work per image: ``dicomfile.parse`` converts elements and reads the
indexed attributes without pydicom's ``Dataset.__getitem__`` machinery. Nothing stored may
change: for every file of the test corpus and
every pydicom test file, ``parse.parse`` gives the same ``ParsedInstance`` (every indexed
attribute, the stored header JSON byte for byte, digest, size) or the same refusal as the
reference below, which is the code before the change (``iterall`` touching every value,
``Dataset.get`` per keyword).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from pacsvault.dicomfile import inflate, parse, vr_check
from tests import corpus


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if not parse.is_uid(value):
        raise parse.InvalidObject(f"missing or invalid {keyword}")
    return value


def _reference(raw: bytes) -> parse.ParsedInstance:
    """``parse.parse`` as it was before issue 17's per-image cut."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = inflate.read(raw)
        except inflate.InflateLimitExceeded as exc:
            raise parse.ObjectTooLarge(str(exc)) from None
        except Exception as exc:
            raise parse.UnreadableObject(type(exc).__name__) from None
        try:
            for tag in list(ds.keys()):
                if parse._truncated(ds.get_item(tag)):
                    raise parse.UnreadableObject(
                        "element value shorter than its declared length")
            for elem in ds.iterall():
                _ = elem.value
            meta_ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        except parse.UnreadableObject:
            raise
        except Exception as exc:
            raise parse.UnreadableObject(type(exc).__name__) from None
        if not meta_ts:
            raise parse.UnreadableObject("no transfer syntax")
        uids = [_uid(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                      "SeriesInstanceUID")]
        try:
            meta = parse.header_json(ds)
        except Exception:
            meta = {}
    mismatch = vr_check.first_mismatch(meta)
    if mismatch is not None:
        raise parse.MismatchedVR(mismatch)
    meta = vr_check.sanitise(meta)
    meta.pop("7FE00010", None)
    t = {k: _text(ds, k) for k in (
        "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
        "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
        "ReferringPhysicianName", "Modality", "SeriesDescription", "BodyPartExamined",
        "SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime", "ContentDate", "ContentTime")}
    return parse.ParsedInstance(
        sop_class_uid=uids[0], sop_uid=uids[1], study_uid=uids[2], series_uid=uids[3],
        transfer_syntax=meta_ts, patient_id=t["PatientID"], issuer=t["IssuerOfPatientID"],
        patient_name=t["PatientName"], birth_date=t["PatientBirthDate"],
        sex=t["PatientSex"], study_date=t["StudyDate"], study_time=t["StudyTime"],
        accession_number=t["AccessionNumber"], study_id=t["StudyID"],
        study_description=t["StudyDescription"],
        referring_physician=t["ReferringPhysicianName"], modality=t["Modality"],
        series_number=_int(ds, "SeriesNumber"), series_description=t["SeriesDescription"],
        body_part=t["BodyPartExamined"], series_date=t["SeriesDate"],
        series_time=t["SeriesTime"],
        performed_start_date=t["PerformedProcedureStepStartDate"],
        performed_start_time=t["PerformedProcedureStepStartTime"],
        instance_number=_int(ds, "InstanceNumber"), rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"), number_of_frames=_int(ds, "NumberOfFrames"),
        content_date=t["ContentDate"], content_time=t["ContentTime"],
        meta_json=json.dumps(meta, separators=(",", ":")),
        sha256=hashlib.sha256(raw).digest(), size=len(raw),
    )


def _outcome(fn: object, raw: bytes) -> tuple[str, object]:
    try:
        return "ok", fn(raw)  # type: ignore[operator]
    except Exception as exc:
        return type(exc).__name__, str(exc)


def _fields(result: object) -> dict[str, object]:
    if isinstance(result, parse.ParsedInstance):
        return dict(vars(result))
    return {"error": result}


def _same(path: Path) -> str:
    raw = path.read_bytes()
    expected, got = _outcome(_reference, raw), _outcome(parse.parse, raw)
    assert got[0] == expected[0], path.name
    assert _fields(got[1]) == _fields(expected[1]), path.name
    return got[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[corpus.CorpusFile]:
    return corpus.build(tmp_path_factory.mktemp("same-record"))


def test_the_corpus_gives_the_same_record(files: list[corpus.CorpusFile]) -> None:
    outcomes = [_same(f.path) for f in files]
    assert outcomes == ["ok"] * len(files)


def test_every_pydicom_test_file_gives_the_same_record_or_refusal(tmp_path: Path) -> None:
    paths = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))
    outcomes = [_same(p) for p in paths]
    assert outcomes.count("ok") > 50, outcomes  # most are Part 10 files we accept
    # a deflated one too, and one beyond the inflation limit
    deflated = [p for p in paths if p.name == "image_dfl.dcm"]
    assert deflated and _same(deflated[0]) == "ok"
    original = inflate._limit
    inflate.set_limit(1024)
    try:
        assert _same(deflated[0]) == "ObjectTooLarge"
    finally:
        inflate.set_limit(original)

