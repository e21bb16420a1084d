"""Patient CD / USB key (issue 20, part 4): a DICOM media from the CLI and as a ZIP download.

One vault and HTTPS server per module. One patient (an accented name: the listing page is
UTF-8), two studies: the first of two series (three and two images), the second of one
image; some Type 1 record attributes left empty on purpose (no Series Number, no Study
Date), as modalities do. The images are sent by dcmtk's ``storescu``; the originals stay
in the test's folder to compare with what comes back.

Checked: ``export --media`` writes a file-set that pydicom's ``FileSet`` loads (every
referenced file exists, one record per instance, general-purpose file IDs) and that dcmtk
reads (``dcmdump``) and validates (``dcmmkdir``, General Purpose profile, on the written
DICOMDIR in update mode with nothing written); the physician's ZIP download holds the
same media with each instance's dataset byte-identical to what ``storescu`` sent; the
route refuses a browser without a session and the other roles; the download is recorded
as an export with counts and the user and no patient data in its readable fields; no file
under the vault's data folder holds plaintext while and after the download streams.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.harness.peers import dcmtk, dcmtk_env
from tests.helpers import Server, VaultDir, events, make_vault, start_server, storescu
from tests.web_helpers import client, page_csrf, sign_in

PHYSICIAN, AUDITOR = "dr-media", "dpo-media"
PASSWORD = "gravure-du-cd-pour-la-patiente"
NAME, PATIENT_ID = "Hélène^Dupré", "PVMEDIA01"
FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")
# a vault, a server and dcmtk runs: tens of seconds on a loaded machine
pytestmark = pytest.mark.slow


@dataclass
class World:
    vault: VaultDir
    server: Server
    originals: dict[str, Path]  # SOP Instance UID -> the file storescu sent
    studies: list[str]
    doctor: httpx.Client
    csrf: str

    def browser(self) -> httpx.Client:
        return client(self.server.https_port, self.vault.data / "tls" / "ca.crt")


def _images(out: Path) -> tuple[list[Path], list[str]]:
    """Six small CT images: study 1 (series of 3 with a number, series of 2 without),
    study 2 (1 image, no study date or ID)."""
    rng = np.random.default_rng(20)
    studies = [str(generate_uid()), str(generate_uid())]
    plan = [(0, "1", 3), (0, "", 2), (1, "7", 1)]
    paths: list[Path] = []
    for study_index, series_number, count in plan:
        series = generate_uid()
        for n in range(count):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = studies[study_index], series
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, "19610203"
            if study_index == 0:
                ds.StudyDate, ds.StudyTime, ds.StudyID = "20261201", "101500", "42"
                ds.StudyDescription = "Scanner thoracique"
            ds.Modality, ds.InstanceNumber = "CT", n + 1
            if series_number:
                ds.SeriesNumber = series_number
            ds.Rows = ds.Columns = 16
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = rng.integers(-1000, 2000, (16, 16), dtype=np.int16).tobytes()
            path = out / f"img{len(paths)}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths, studies


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("media")
    vault = make_vault(root / "v")
    vault.add_node("MODALITY")
    (root / "sent").mkdir()
    paths, studies = _images(root / "sent")
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PASSWORD, by="test")
        v.accounts.add_user(AUDITOR, ["auditor"], PASSWORD, by="test")
    finally:
        v.close()
    server = start_server(vault)
    try:
        sent = storescu(server.port, paths, calling="MODALITY")
        assert sent.returncode == 0, sent.stderr
        originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                     for p in paths}
        doctor = client(server.https_port, vault.data / "tls" / "ca.crt")
        try:
            sign_in(doctor, PHYSICIAN, PASSWORD)
            yield World(vault, server, originals, studies, doctor, page_csrf(doctor))
        finally:
            doctor.close()
    finally:
        server.stop()


def _dataset_part(raw: bytes) -> bytes:
    """Everything after the preamble and the file meta group (0002): what travels over
    DIMSE, so what storescu sent."""
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_len:]


def _digest(raw: bytes) -> str:
    return hashlib.sha256(_dataset_part(raw)).hexdigest()


def _check_file_set(world: World, root: Path, expected: set[str], scratch: Path) -> None:
    """pydicom reads the file-set back; dcmtk dumps and validates it."""
    fs = FileSet(root / "DICOMDIR")
    assert len(fs) == len(expected)
    found: set[str] = set()
    for instance in fs:
        parts = Path(instance.FileID).parts
        assert len(parts) <= 8 and all(FILE_ID.match(p) for p in parts), parts
        path = Path(instance.path)
        assert path.is_file()
        ds = dcmread(path)
        assert ds.SOPInstanceUID == instance.ReferencedSOPInstanceUIDInFile
        uid = str(ds.SOPInstanceUID)
        found.add(uid)
        assert _digest(path.read_bytes()) == _digest(world.originals[uid].read_bytes())
    assert found == expected
    assert {str(r.PatientName) for r in fs.find(PatientID=PATIENT_ID)} == {NAME}

    dump = subprocess.run([dcmtk("dcmdump"), str(root / "DICOMDIR")], capture_output=True,
                          text=True, env=dcmtk_env(), timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "MediaStorageDirectoryStorage" in dump.stdout
    assert dump.stdout.count("[IMAGE]") == len(expected)
    # dcmmkdir in update mode (on a copy: it rewrites the DICOMDIR) reads the DICOMDIR
    # (record offsets resolved), checks every referenced file against the General Purpose
    # profile (transfer syntax, file IDs) and against the existing records, aborting on an
    # inconsistent one; a file the DICOMDIR did not list already would add a record.
    # --invent: the modality left some Type 1 attributes empty in the files themselves
    # (the media's records hold placeholders; the files stay as sent).
    copy = scratch / "dcmtk-check"
    shutil.copytree(root, copy)
    files = [str(Path(i.FileID)) for i in fs]
    check = subprocess.run(
        [dcmtk("dcmmkdir"), "--general-purpose", "--update", "--no-backup", "--invent",
         "--abort-inconsist-file", "--input-directory", str(copy),
         "--output-file", str(copy / "DICOMDIR"), *files],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60, cwd=copy)
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    assert not [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
    redump = subprocess.run([dcmtk("dcmdump"), str(copy / "DICOMDIR")], capture_output=True,
                            text=True, env=dcmtk_env(), timeout=60)
    assert redump.stdout.count("[IMAGE]") == len(expected)


def _study_sops(world: World, study: str) -> set[str]:
    return {uid for uid, p in world.originals.items()
            if dcmread(p, stop_before_pixels=True).StudyInstanceUID == study}


def test_cli_media_export_is_a_valid_file_set(world: World, tmp_path: Path) -> None:
    out = tmp_path / "usb"
    proc = world.vault.cli("export", "--media", out, "--study", world.studies[0],
                           "--lang", "en")
    assert "5 instance(s)" in proc.stderr
    for secret in (PATIENT_ID, world.studies[0], "Dupr"):
        assert secret not in proc.stdout + proc.stderr
    _check_file_set(world, out, _study_sops(world, world.studies[0]), tmp_path / "s1")
    listing = (out / "INDEX.HTM").read_text("utf-8")
    assert "Hélène Dupré" in listing and PATIENT_ID in listing
    assert "Scanner thoracique" in listing and "<script" not in listing
    assert (out / "README.TXT").is_file()
    assert oct((out / "DICOMDIR").stat().st_mode & 0o777) == "0o600"
    # the whole patient: both studies; a folder with a DICOMDIR already is refused
    whole = tmp_path / "cd"
    world.vault.cli("export", "--media", whole, "--patient", PATIENT_ID)
    _check_file_set(world, whole, set(world.originals), tmp_path / "s2")
    again = world.vault.cli("export", "--media", whole, "--patient", PATIENT_ID,
                            check=False)
    assert again.returncode != 0 and "already holds a DICOMDIR" in again.stderr


def _snapshot(data: Path) -> dict[Path, tuple[int, int]]:
    out = {}
    for folder, _dirs, names in os.walk(data):
        for name in names:
            path = Path(folder) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def _plaintext_in(data: Path, before: dict[Path, tuple[int, int]]) -> list[Path]:
    """Files new or changed since ``before`` that hold a DICOM file or the patient's
    name or ID in clear."""
    markers = (b"DICM", NAME.encode(), PATIENT_ID.encode(), b"Scanner thoracique")
    bad = []
    for path, stamp in _snapshot(data).items():
        if before.get(path) == stamp:
            continue
        try:
            content = path.read_bytes()
        except OSError:
            continue
        if any(m in content for m in markers):
            bad.append(path)
    return bad


def test_zip_download_is_the_media_byte_identical(world: World) -> None:
    before = _snapshot(world.vault.data)
    received = bytearray()
    checked_midway = False
    with world.doctor.stream("POST", "/account/media/download",
                             data={"csrf": world.csrf, "patient": PATIENT_ID}) as res:
        assert res.status_code == 200
        assert res.headers["content-type"] == "application/zip"
        assert res.headers["cache-control"] == "no-store"
        announced = int(res.headers["content-length"])  # progress in the browser
        assert PATIENT_ID not in res.headers["content-disposition"]
        for chunk in res.iter_bytes():
            received += chunk
            if len(received) > 4096 and not checked_midway:  # once, while it streams
                checked_midway = True
                assert _plaintext_in(world.vault.data, before) == []
    assert _plaintext_in(world.vault.data, before) == []
    with zipfile.ZipFile(io.BytesIO(bytes(received))) as z:
        names = z.namelist()
        assert all(n.startswith("DICOM-MEDIA/") for n in names)
        assert {"DICOM-MEDIA/DICOMDIR", "DICOM-MEDIA/INDEX.HTM",
                "DICOM-MEDIA/README.TXT"} <= set(names)
        got: dict[str, str] = {}
        for name in names:
            data = z.read(name)
            if name.count("/") >= 2:  # an instance under PT.../ST.../SE.../
                got[str(dcmread(io.BytesIO(data)).SOPInstanceUID)] = \
                    hashlib.sha256(_dataset_part(data)).hexdigest()
    assert checked_midway
    assert announced == len(received)
    assert got == {uid: _digest(p.read_bytes()) for uid, p in world.originals.items()}


def test_zip_download_refused_without_session_and_other_roles(world: World) -> None:
    with world.browser() as anonymous:
        res = anonymous.post("/account/media/download", data={"patient": PATIENT_ID})
        assert res.status_code in (303, 401, 403)
        assert res.headers.get("content-type", "") != "application/zip"
    with world.browser() as auditor:
        sign_in(auditor, AUDITOR, PASSWORD)
        csrf = page_csrf(auditor)
        res = auditor.post("/account/media/download",
                           data={"csrf": csrf, "patient": PATIENT_ID})
        assert res.status_code == 403
        assert auditor.get("/account/media").status_code == 403
    # the physician without the form's CSRF token: refused too
    res = world.doctor.post("/account/media/download", data={"patient": PATIENT_ID})
    assert res.status_code == 403
    # the form, filled in from a link (the viewer's study)
    form = world.doctor.get("/account/media", params={"study": world.studies[0]})
    assert form.status_code == 200 and f'value="{world.studies[0]}"' in form.text
    # unknown study: the page again, with a message, nothing exported
    res = world.doctor.post("/account/media/download",
                            data={"csrf": world.csrf, "study": "1.2.3.4"})
    assert res.status_code == 400 and "media-study-form" in res.text


def test_download_is_recorded_as_a_disclosure(world: World) -> None:
    res = world.doctor.post("/account/media/download",
                            data={"csrf": world.csrf, "study": world.studies[1]})
    assert res.status_code == 200
    recorded = [e for e in events(world.vault, "export.media")
                if e["destination"] == "web download"]
    assert recorded
    last = recorded[-1]
    assert last["code"] == "110106" and last["user"] == PHYSICIAN
    assert last["instances"] == 1 and last["studies"] == 1 and last["patients"] == 1
    assert last["study_uids"] == [world.studies[1]]
    assert last["patient_ids"] == [PATIENT_ID]
    readable = {k: v for k, v in last.items()
                if k not in ("study_uids", "sop_uids", "patient_ids")}
    for secret in (PATIENT_ID, world.studies[1], "Dupr", *world.originals):
        assert secret not in repr(readable)


def test_quarantined_instances_stay_off_the_media(world: World) -> None:
    """An instance an administrator hid is not on the patient's media (the physicians do
    not see it either): study 2's only image hidden, its download has nothing to give."""
    from pacsvault.storage.removal import Remover

    [hidden] = _study_sops(world, world.studies[1])
    v = world.vault.open()
    try:
        remover = Remover(v.engine, v.store, v.recorder)
        remover.quarantine(hidden, "wrong patient", actor="test")
        try:
            res = world.doctor.post("/account/media/download",
                                    data={"csrf": world.csrf, "study": world.studies[1]})
            assert res.status_code == 400 and "media-study-form" in res.text
        finally:
            remover.release(hidden, "checked", actor="test")
    finally:
        v.close()


class _Files:
    def __init__(self, files: list[tuple[str, bytes]]) -> None:
        self._files = files

    def files(self) -> Iterator[tuple[str, bytes]]:
        yield from self._files


@pytest.mark.parametrize("count", [0, 1, 7, 40])
def test_announced_zip_length_is_exact(count: int) -> None:
    """``zipped.length`` (the Content-Length) against the bytes ``zipped.stream`` makes."""
    from pacsvault.media import zipped

    rng = np.random.default_rng(count)
    files = [(f"PT000000/ST000000/SE{k % 3:06d}/IM{k:06d}",
              rng.bytes(int(rng.integers(0, 3000)))) for k in range(count)]
    files.append(("DICOMDIR", b"x" * 17))
    for folder in ("", "DICOM-MEDIA"):
        out = b"".join(zipped.stream(_Files(files), folder))
        assert zipped.length([(n, len(d)) for n, d in files], folder) == len(out)
        with zipfile.ZipFile(io.BytesIO(out)) as z:
            assert z.testzip() is None and len(z.namelist()) == count + 1
    assert zipped.length([("a", 2**31)]) is None  # ZIP64: sent chunked, no length
