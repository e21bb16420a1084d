"""De-identified exports (issue 19, part 1): PS3.15 Annex E with explicit options.

The test corpus (tests/corpus.py: marker patient names, IDs, birth dates) is stored in one
vault per module, each file given a marker accession number, a nested sequence holding a
person name and an original UID, and private tags (one inside the sequence) holding the
patient's name. Exports then go through the real command line (``export --deidentify``)
and, for the project comparisons, the workflow in-process. Every output file is scanned
twice: its bytes, and an element walk of every element including sequences.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary, generate_uid  # type: ignore[attr-defined]
from sqlalchemy import select

from pacsvault.deidentify import export as deid
from pacsvault.deidentify.engine import burned_in_reason
from pacsvault.deidentify.options import profile
from pacsvault.index.deployment_state import LinkRow
from tests import corpus
from tests.helpers import VaultDir, events, make_vault


@dataclass
class Env:
    vault: VaultDir
    files: list[corpus.CorpusFile]
    secrets: list[str]  # text that must appear nowhere in an export
    uids: set[str]  # every original non-standard UID of the corpus


def _uids_of(ds: Dataset, found: set[str]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _uids_of(item, found)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            found.update(str(v) for v in values if str(v) not in UID_dictionary)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("deidentify")
    vault = make_vault(root / "vault")
    files = corpus.build(root / "corpus")
    secrets = corpus.secrets_of(files)
    uids: set[str] = set()
    v = vault.open()
    try:
        for i, f in enumerate(files):
            ds = dcmread(f.path)
            accession = f"ACCPV{i:03d}Q"
            secrets.append(accession)
            ds.AccessionNumber = accession
            ds.OtherPatientIDs = f"OTHERPV{i:03d}"
            secrets.append(f"OTHERPV{i:03d}")
            ds.ReferringPhysicianName = f"Referrer^Marcellin{i:02d}"
            secrets.append(f"Marcellin{i:02d}")
            ds.StudyDescription = f"Knee {f.patient_name} follow-up"
            block = ds.private_block(0x0011, "PVTEST", create=True)
            block.add_new(0x01, "LO", f.patient_name)
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = generate_uid()
            item.add_new(0x00091001, "LO", f.patient_id)  # private, nested
            item.add_new(0x00091000, "LO", "PVTEST")
            item.ContentCreatorName = f.patient_name
            ds.SourceImageSequence = Sequence([item])
            _uids_of(ds, uids)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            v.archive.store(buf.getvalue(), source_ae="TEST")
    finally:
        v.close()
    yield Env(vault, files, secrets, uids)


def _scan(folder: Path, env: Env) -> list[Dataset]:
    """Byte scan and element walk of every file of an export; answer the datasets."""
    datasets: list[Dataset] = []
    needles = [(s, s.encode(enc)) for s in env.secrets for enc in ("utf-8", "latin-1")
               if s.isascii() or enc == "utf-8" or s.encode("latin-1", "ignore")]
    needles += [(u, u.encode()) for u in env.uids]
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        for text, needle in needles:
            assert needle not in raw, f"{path.name}: original value found in the bytes"
            assert text not in path.as_posix()
        if path.suffix != ".dcm":
            continue
        ds = dcmread(path)
        datasets.append(ds)
        _walk(ds, env, path.name)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    return datasets


def _walk(ds: Dataset, env: Env, where: str) -> None:
    for elem in ds:
        assert not elem.tag.is_private, f"{where}: private tag {elem.tag}"
        if elem.VR == "SQ":
            for item in elem.value:
                _walk(item, env, where)
            continue
        if elem.VR in ("OB", "OW", "OF", "UN") or elem.tag == 0x7FE00010:
            continue
        text = str(elem.value)
        for secret in env.secrets:
            assert secret.upper() not in text.upper(), f"{where}: {elem.keyword} kept a marker"
        if elem.VR == "UI" and elem.value:
            assert str(elem.value) not in env.uids, f"{where}: original {elem.keyword}"


def _export(env: Env, out: Path, *args: str, check: bool = True) -> str:
    selection = () if "--study" in args else ("--all",)
    proc = env.vault.cli("export", "--out", out, *selection, *args, check=check)
    return proc.stderr


@pytest.mark.slow
def test_cli_export_leaves_no_identifier_anywhere(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "research"
    said = _export(env, out, "--deidentify", "research", "--project", "knee-study",
                   "--accept-burned-in")
    assert "WARNING" in said and "pseudonymised, not anonymous" in said
    for secret in env.secrets:
        assert secret not in said
    datasets = _scan(out, env)
    assert len(datasets) == len(env.files)
    # the images themselves are untouched: same pixel data, same geometry
    def image(ds: Dataset) -> tuple[object, ...]:
        return (bytes(ds.PixelData), ds.Rows, ds.Columns, str(ds.get("PixelSpacing", "")))
    assert {image(ds) for ds in datasets} == {image(dcmread(f.path)) for f in env.files}
    readme = (out / "README.txt").read_text()
    assert "PSEUDONYMISED, NOT ANONYMOUS" in readme and "113107" in readme
    ds = datasets[0]
    codes = {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113108", "113109", "113105"}
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    # the basic profile too (no option: dates removed)
    basic = tmp_path / "basic"
    _export(env, basic, "--deidentify", "basic", "--project", "knee-study",
            "--accept-burned-in")
    for ds in _scan(basic, env):
        assert "StudyDate" not in ds and "StudyDescription" not in ds
        assert {i.CodeValue for i in ds.DeidentificationMethodCodeSequence} == {"113100"}
    # the audit trail has both, with project and options, and no patient data in the detail
    found = events(env.vault, "export.deidentified")
    assert [(e["project"], e["profile"]) for e in found[-2:]] == [
        ("knee-study", "research"), ("knee-study", "basic")]
    assert found[-2]["options"] == ("modified-dates,patient-characteristics,"
                                    "device-identity,clean-descriptors")
    assert found[-1]["instances"] == len(env.files)
    for e in found:
        detail = {k: v for k, v in e.items() if k not in ("study_uids", "sop_uids",
                                                          "patient_ids")}
        for secret in env.secrets:
            assert secret not in repr(detail)


def _pseudonyms(env: Env, project: str, folder: Path) -> dict[str, str]:
    """Patient ID -> pseudonym of one in-process export (burned-in accepted)."""
    written: dict[str, bytes] = {}
    v = env.vault.open()
    try:
        items = list(v.archive.locate())
        request = deid.Request(project=project, profile=profile("research"),
                               accept_burned_in=True, link_table=True)
        deid.export(v, items, request, lambda name, data: written.__setitem__(name, data))
        links = deid.LinkTable(v, project).read()
    finally:
        v.close()
    by_id = {pid: pseudonym for pseudonym, pid in links.items()}
    assert set(by_id) == {f.patient_id for f in env.files}
    for name, data in written.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return by_id


def test_same_patient_same_pseudonym_within_a_project_only(env: Env, tmp_path: Path) -> None:
    first = _pseudonyms(env, "project-a", tmp_path / "a1")
    again = _pseudonyms(env, "project-a", tmp_path / "a2")
    other = _pseudonyms(env, "project-b", tmp_path / "b")
    assert first == again
    assert all(first[pid] != other[pid] for pid in first)
    assert len(set(first.values())) == len(first)
    # UIDs: same in two exports of one project, different in another
    a1 = {str(dcmread(p).StudyInstanceUID) for p in (tmp_path / "a1").rglob("*.dcm")}
    a2 = {str(dcmread(p).StudyInstanceUID) for p in (tmp_path / "a2").rglob("*.dcm")}
    b = {str(dcmread(p).StudyInstanceUID) for p in (tmp_path / "b").rglob("*.dcm")}
    assert a1 == a2 and not a1 & b
    # dates (modified-dates option): shifted, by the same days in every export of a project
    dates = [{str(dcmread(p).get("StudyDate", "")) for p in (tmp_path / d).rglob("*.dcm")}
             for d in ("a1", "a2", "b")]
    assert dates[0] == dates[1] and dates[0] != dates[2]
    originals = {str(dcmread(f.path).get("StudyDate", "")) for f in env.files} - {""}
    assert originals and not originals & dates[0]
    assert all(u.startswith("2.25.") for u in a1)
    # the link table stays inside the vault's index, encrypted: no patient ID, pseudonym or
    # project name readable in its rows (what a PostgreSQL dump would show)
    v = env.vault.open()
    try:
        with v.engine.connect() as conn:
            rows = list(conn.execute(select(LinkRow.__table__)))
    finally:
        v.close()
    assert len({row.project for row in rows}) == 2
    raw = b"".join(b"".join(c if isinstance(c, bytes) else str(c).encode() for c in row)
                   for row in rows)
    assert all(f.patient_id.encode() not in raw for f in env.files)
    assert b"project-" not in raw
    for folder in ("a1", "b"):
        _scan(tmp_path / folder, env)


@pytest.mark.slow
def test_burned_in_refused_without_confirmation(env: Env, tmp_path: Path) -> None:
    us = next(f for f in env.files if dcmread(f.path).get("Modality") == "US")
    assert burned_in_reason(dcmread(us.path)).startswith("modality US")
    before = len(events(env.vault, "export.deidentified"))
    out = tmp_path / "us"
    proc = env.vault.cli("export", "--out", out, "--study", us.study_uid, "--deidentify",
                         "basic", "--project", "p", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "pixels" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    assert len(events(env.vault, "export.deidentified")) == before
    _export(env, out, "--study", us.study_uid, "--deidentify", "basic", "--project", "p",
            "--accept-burned-in")
    [ds] = _scan(out, env)
    assert ds.Modality == "US"
    assert "1 object(s) were flagged" in (out / "README.txt").read_text()


@pytest.mark.slow
def test_cli_refusals(env: Env, tmp_path: Path) -> None:
    proc = _export(env, tmp_path / "x", "--deidentify", "nope", "--project", "p", check=False)
    assert "unknown de-identification profile" in proc
    proc = _export(env, tmp_path / "x", "--deidentify", "basic", check=False)
    assert "project" in proc
    proc = _export(env, tmp_path / "x", "--project", "p", check=False)
    assert "goes with --deidentify" in proc
    assert not (tmp_path / "x").exists()


def _sample() -> Dataset:
    ds = dcmread(cast(str, get_testdata_file("CT_small.dcm")))
    ds.InstitutionName, ds.StationName, ds.DeviceSerialNumber = "Clinique X", "CT01", "SN42"
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "F", "042Y", "61"
    ds.SeriesDescription, ds.StudyDescription = "Thorax", f"Thorax {ds.PatientName}"
    ds.add_new(0x00091010, "LO", "private")
    return ds


@pytest.mark.parametrize("name", ["basic", "research", "teaching"])
def test_options_keep_what_they_name_only(name: str) -> None:
    """Table E.1-1 columns, option by option (in memory, no vault)."""
    from pacsvault.deidentify.engine import Pseudonyms, deidentify

    ds, original = _sample(), _sample()
    chosen = profile(name)
    deidentify(ds, chosen, Pseudonyms(b"k" * 32))
    device = chosen.has("device-identity")
    characteristics = chosen.has("patient-characteristics")
    clean = chosen.has("clean-descriptors")
    assert "InstitutionName" not in ds  # Retain Institution Identity is never offered
    assert ("StationName" in ds) == device and ("DeviceSerialNumber" in ds) == device
    assert ("PatientAge" in ds) == characteristics
    assert (ds.get("PatientSex") or "") == ("F" if characteristics else "")
    assert ("SeriesDescription" in ds) == clean
    assert "StudyDescription" not in ds  # cleaned away: it held the patient's name
    assert not any(e.tag.is_private for e in ds.iterall())
    if chosen.has("modified-dates"):
        assert ds.StudyDate and ds.StudyDate != original.StudyDate
        assert ds.StudyTime == original.StudyTime  # times of day kept
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    else:
        assert not ds.get("StudyDate") and not ds.get("StudyTime")
    method = ds.DeidentificationMethod
    first = method if isinstance(method, str) else method[0]
    assert first.startswith("PS3.15 E.1 Basic Profile")
    count = ds["DeidentificationMethod"].VM
    assert count == len(chosen.options) + 1  # the profile, then one value per option
