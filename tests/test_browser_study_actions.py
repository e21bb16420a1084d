"""A physician's study actions and the Health page's connection test, in a real Chromium
(issue 20, parts 4, 5 and 7: the browser tests it asks for).

The httpx tests (test_media_export.py, test_send.py, test_health_page.py) prove the
routes; these prove the pages a doctor clicks through in a French practice: OHIF's study
list, the study's "Download, send, share…" mode button, pacsvault's study actions, the
patient CD page (Playwright's download: the ZIP a browser saves), the send page (its
self-refreshing progress until the result) and the Health page's "Tester la connexion".

Checked: the study's patient CD, downloaded from the study list, unzips to a file-set that
pydicom's ``FileSet`` loads and dcmtk dumps (``dcmdump``) and validates (``dcmmkdir``,
General Purpose profile, update mode on a copy, aborting on an inconsistent file); the
patient's ZIP holds every instance with its dataset byte-identical to what ``storescu``
sent (the part after the file meta group: what travels over DIMSE), named without patient
data and announced with its exact length; "Envoyer à…" to a node whose port is a dcmtk
``storescp`` shows "Toutes les images ont été envoyées." and storescp holds each instance
of that study (and none of the other) byte-identical; the Health page's button answers
"a répondu" for the running storescp and "pas de réponse … l’appareil est-il allumé" for a
node whose port has nothing listening, and the page's sizes and dates in French format
("45,8 ko", not "45.8 KB"). One server, one storescp and one signed-in browser
(a user who is physician and administrator) for the module; no page logs a JS error.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests import browser_data
from tests.browser import ErrorLog, first_sign_in, new_page, shot
from tests.browser import browser_fixture as browser_fixture  # fixture 'browser'
from tests.harness.peers import StoreSCP, dcmtk, dcmtk_env, free_port
from tests.helpers import Server, make_vault, start_server, storescu
from tests.web_helpers import write_secret

pytestmark = [pytest.mark.browser, pytest.mark.slow]

USER, PASSWORD = "drlaurent", "le scanner du mardi matin est plein 2027"
MODALITY, WORKSTATION, GONE = "MODALITY", "WORKSTATION", "OLDSTATION"
ACTIONS = "pacsvault-study-actions"  # the study list's mode button for pacsvault's actions
ZIP_NAME = "dicom-media.zip"
FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")


@dataclass
class Site:
    base: str
    server: Server
    scp: StoreSCP  # the colleague's workstation: dcmtk storescp, files as received (+B)
    studies: list[str]  # two studies of one patient (3 and 2 images)
    patient_id: str
    originals: dict[str, Path]  # SOP Instance UID -> the file storescu sent
    study_of: dict[str, str]  # SOP Instance UID -> its study

    def sops(self, study: str) -> set[str]:
        return {uid for uid, s in self.study_of.items() if s == study}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("study-actions")
    scp = StoreSCP.start(WORKSTATION, root, "+B", "+xa")
    try:
        vault = make_vault(root / "v")
        vault.add_node(MODALITY)
        vault.add_node(WORKSTATION, "--port", str(scp.port), "--roles", "retrieve")
        vault.add_node(GONE, "--port", str(free_port()), "--roles", "retrieve")  # nobody
        secret = write_secret(root / "user.pw", PASSWORD + "\n")
        vault.cli("user", "add", USER, "--role", "physician", "--role", "admin",
                  "--password-file", secret)
        server = start_server(vault)
        try:
            series = [browser_data.knee_ct(root / "ct1", count=3, size=64),
                      browser_data.knee_ct(root / "ct2", count=2, size=64)]
            files = [p for s in series for p in s.files]
            sent = storescu(server.port, files, calling=MODALITY)
            assert sent.returncode == 0, sent.stderr
            originals, study_of = {}, {}
            for path in files:
                ds = dcmread(path, stop_before_pixels=True)
                originals[str(ds.SOPInstanceUID)] = path
                study_of[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
            patient_id = str(dcmread(files[0], stop_before_pixels=True).PatientID)
            yield Site(f"https://localhost:{server.https_port}", server, scp,
                       [s.study_uid for s in series], patient_id, originals, study_of)
        finally:
            server.stop()
    finally:
        scp.stop()


@dataclass
class Doctor:
    page: Any
    errors: ErrorLog


@pytest.fixture(scope="module")
def doctor(site: Site, browser: Any) -> Iterator[Doctor]:
    errors = ErrorLog()
    page = new_page(browser, locale="fr-FR", errors=errors)
    first_sign_in(page, site.base, USER, PASSWORD)
    yield Doctor(page, errors)
    page.context.close()


def _clean(errors: ErrorLog) -> None:
    assert errors.entries == [], "\n".join(errors.entries)


def _dataset_part(raw: bytes) -> bytes:
    """Everything after the preamble and the file meta group (0002): what travels over
    DIMSE, so what storescu sent (each receiver writes its own meta group)."""
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_len:]


def _digest(raw: bytes) -> str:
    return hashlib.sha256(_dataset_part(raw)).hexdigest()


def _study_actions(page: Any, site: Site, study: str) -> Any:
    """OHIF's study list → the study's row → its "Download, send, share…" button →
    pacsvault's actions of that one study; the row there."""
    page.goto(site.base + "/")
    page.locator(f"[data-cy='studyRow-{study}']").first.click()
    with page.expect_navigation():
        page.locator(f"[data-cy='mode-{ACTIONS}-{study}']").first.click()
    page.wait_for_url(re.compile(r"/account/studies$"))
    rows = page.locator("#study-actions tbody tr")
    assert rows.count() == 1 and rows.first.get_attribute("data-study") == study
    return rows.first


def _open(page: Any, row: Any, action: str) -> None:
    with page.expect_navigation():
        row.locator(f"button[data-action='{action}']").click()
    assert page.url.endswith("/account/studies/open"), page.url  # the study went by POST


def _download(page: Any, button: str, folder: Path) -> tuple[Path, dict[str, str]]:
    """Click ``button`` (its French label), save the browser's download in ``folder``;
    the file and the response's headers."""
    folder.mkdir(parents=True, exist_ok=True)
    answers: list[Any] = []

    def keep(response: Any) -> None:
        if response.url.endswith("/account/media/download"):
            answers.append(response)

    page.on("response", keep)
    try:
        with page.expect_download(timeout=120_000) as info:
            page.get_by_role("button", name=button, exact=True).click()
        download = info.value
        assert download.failure() is None, download.failure()
        assert download.suggested_filename == ZIP_NAME
        saved = folder / download.suggested_filename
        download.save_as(saved)
    finally:
        page.remove_listener("response", keep)
    assert len(answers) == 1, [a.url for a in answers]
    return saved, dict(answers[0].all_headers())


def _check_file_set(site: Site, root: Path, expected: set[str], scratch: Path) -> None:
    """pydicom reads the file-set back; dcmtk dumps and validates it (as in
    test_media_export.py, on the folder the browser's ZIP unpacked to)."""
    fs = FileSet(root / "DICOMDIR")
    assert len(fs) == len(expected)
    found: set[str] = set()
    for instance in fs:
        parts = Path(instance.FileID).parts
        assert len(parts) <= 8 and all(FILE_ID.match(p) for p in parts), parts
        ds = dcmread(instance.path)
        assert ds.SOPInstanceUID == instance.ReferencedSOPInstanceUIDInFile
        found.add(str(ds.SOPInstanceUID))
    assert found == expected
    assert len(fs.find(PatientID=site.patient_id)) == len(expected)

    dump = subprocess.run([dcmtk("dcmdump"), str(root / "DICOMDIR")], capture_output=True,
                          text=True, env=dcmtk_env(), timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "MediaStorageDirectoryStorage" in dump.stdout
    assert dump.stdout.count("[IMAGE]") == len(expected)
    # dcmmkdir in update mode, on a copy (it rewrites the DICOMDIR): reads the records,
    # checks each referenced file against the General Purpose profile and its record,
    # aborting on an inconsistent one; a file not listed yet would add a record.
    copy = scratch / "dcmtk-check"
    shutil.copytree(root, copy)
    files = [str(Path(i.FileID)) for i in fs]
    check = subprocess.run(
        [dcmtk("dcmmkdir"), "--general-purpose", "--update", "--no-backup",
         "--abort-inconsist-file", "--input-directory", str(copy),
         "--output-file", str(copy / "DICOMDIR"), *files],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60, cwd=copy)
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    assert not [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
    redump = subprocess.run([dcmtk("dcmdump"), str(copy / "DICOMDIR")], capture_output=True,
                            text=True, env=dcmtk_env(), timeout=60)
    assert redump.stdout.count("[IMAGE]") == len(expected)


def test_patient_cd_from_the_study_list_is_a_dicomdir_dcmtk_and_pydicom_read(
        site: Site, doctor: Doctor, tmp_path: Path) -> None:
    page, study = doctor.page, site.studies[0]
    row = _study_actions(page, site, study)
    assert "Lefebvre" in row.inner_text()
    _open(page, row, "media")
    assert page.locator("#media-study").input_value() == study
    saved, headers = _download(page, "Télécharger l’examen (ZIP)", tmp_path / "downloads")
    assert headers["content-type"] == "application/zip"
    assert int(headers["content-length"]) == saved.stat().st_size  # the progress bar's
    with zipfile.ZipFile(saved) as z:
        assert z.testzip() is None
        z.extractall(tmp_path / "usb")
    media = tmp_path / "usb" / "DICOM-MEDIA"
    _check_file_set(site, media, site.sops(study), tmp_path)
    listing = (media / "INDEX.HTM").read_text("utf-8")
    assert "Lefebvre" in listing and site.patient_id in listing
    shot(page, "study-actions-media-fr")
    _clean(doctor.errors)


def test_patient_zip_holds_every_instance_byte_identical(site: Site, doctor: Doctor,
                                                         tmp_path: Path) -> None:
    """The patient's every study, by the Patient ID the study actions show."""
    page = doctor.page
    row = _study_actions(page, site, site.studies[1])
    patient_id = row.locator("td").nth(1).inner_text().strip()
    assert patient_id == site.patient_id
    _open(page, row, "media")
    page.fill("#media-patient", patient_id)
    saved, headers = _download(page, "Télécharger tous les examens du patient (ZIP)",
                               tmp_path)
    assert headers["cache-control"] == "no-store"
    assert patient_id not in headers["content-disposition"]
    got: dict[str, str] = {}
    with zipfile.ZipFile(saved) as z:
        names = z.namelist()
        assert all(n.startswith("DICOM-MEDIA/") for n in names), names
        assert {"DICOM-MEDIA/DICOMDIR", "DICOM-MEDIA/INDEX.HTM",
                "DICOM-MEDIA/README.TXT"} <= set(names)
        for name in names:
            if name.count("/") >= 2:  # an instance under PT.../ST.../SE.../
                data = z.read(name)
                got[str(dcmread(io.BytesIO(data)).SOPInstanceUID)] = _digest(data)
    assert got == {uid: _digest(p.read_bytes()) for uid, p in site.originals.items()}
    _clean(doctor.errors)


def test_send_to_a_workstation_arrives_byte_identical(site: Site, doctor: Doctor) -> None:
    page, study = doctor.page, site.studies[0]
    row = _study_actions(page, site, study)
    _open(page, row, "send")
    assert page.locator("#send-study").input_value() == study
    page.select_option("#send-node", WORKSTATION)
    with page.expect_navigation():
        page.get_by_role("button", name="Envoyer", exact=True).click()
    assert "/account/send?job=" in page.url, page.url
    # The job page refreshes itself every 2 s until the transfer ends.
    result = page.locator("#send-result")
    result.wait_for(timeout=120_000)
    counts = page.locator("#send-counts").inner_text()
    assert result.inner_text().strip() == "Toutes les images ont été envoyées.", counts
    assert counts.startswith("3 images sur 3 : 3 envoyées, 0 avec un avertissement, 0 en échec"), \
        counts
    assert page.locator("#send-job progress").get_attribute("value") == "3"
    assert page.locator("#send-job").get_attribute("data-running") == "no"
    shot(page, "study-actions-send-fr")
    received = site.scp.files()
    assert set(received) == site.sops(study), site.scp.log()[-2000:]
    for uid, path in received.items():
        assert _digest(path.read_bytes()) == _digest(site.originals[uid].read_bytes())
    _clean(doctor.errors)


def test_health_connection_test_button(site: Site, doctor: Doctor) -> None:
    page = doctor.page
    page.goto(site.base + "/admin/health")
    modality = page.locator(f"tr.device[data-ae='{MODALITY}']")
    assert modality.get_by_role("button").count() == 0  # no port: nothing to call
    for ae, ok, words in ((WORKSTATION, "yes", "a répondu le"),
                          (GONE, "no", "l’appareil est-il allumé")):
        device = page.locator(f"tr.device[data-ae='{ae}']")
        assert device.locator(".echo-result").count() == 0  # not tested yet
        with page.expect_navigation():
            device.get_by_role("button", name="Tester la connexion").click()
        answer = page.locator(f"tr.device[data-ae='{ae}'] .echo-result")
        answer.wait_for()
        assert answer.get_attribute("data-ok") == ok, answer.inner_text()
        assert words in answer.inner_text(), answer.inner_text()
        assert answer.is_visible()
    # The page's sizes in a French practice's format (issue 20, item 2): "45,8 ko".
    for label in ("Images reçues", "Libre sur le disque"):
        shown = page.locator("dt", has_text=label).locator("xpath=following-sibling::dd")
        text = shown.inner_text()
        assert re.search(r"\d\s?[kMGT]?o\b", text) and "B" not in text, (label, text)
    forecast = page.locator("#forecast").inner_text()
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d\.\d", forecast), forecast  # "04/03/2027"
    shot(page, "health-connection-test-fr")
    _clean(doctor.errors)
