"""Issue 11, validation at the door: defects 3 (mismatched VRs), 4 (pathological wildcards)
and 5 (deflate bombs), each attack replayed against the real server on loopback.

- A C-STORE or STOW whose PatientName is encoded with VR US is refused (C000, with the
  reason in the trail) and QIDO keeps answering valid DICOM JSON; a header stored before
  the fix is healed on the answer side (``vr_check.sanitise``), tested directly.
- ``*a*a*a*a*a*a*b`` against 200 ``a`` answers at once over QIDO and C-FIND while C-ECHO
  stays fast; the matcher agrees with a reference on thousands of random cases; a query
  over its time budget stops with a failure status.
- A deflated dataset that inflates beyond ``max_inflated_mb`` is refused (A700) without
  the server's memory growing by the inflated size; a normal deflated image still stores
  and renders, and read paths inflate with the same bound.
"""

from __future__ import annotations

import json
import random
import re
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsvault.dicomfile import inflate, vr_check
from pacsvault.index import matching
from tests.helpers import AE as ARCHIVE_AE
from tests.helpers import Server, VaultDir, echoscu, events, make_vault, start_server, storescu

pytestmark = pytest.mark.slow

MODALITY = "MODALITY"
PHYSICIAN, PHYSICIAN_PW = "drvalid", "amber-glacier-tunnel-58-quiet-meadow"
EVIL_STARS = "*a*a*a*a*a*a*b"
BOMB_MIB = 600  # above the default max_inflated_mb (512)


@dataclass
class Site:
    vault: VaultDir
    server: Server
    token: str
    root: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.https_port}/dicom-web"

    def http(self, timeout: float = 30) -> httpx.Client:
        ca = ssl.create_default_context(cafile=str(self.vault.data / "tls" / "ca.crt"))
        return httpx.Client(verify=ca, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.token}"}, trust_env=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("validation")
    vault = make_vault(root / "v")
    vault.add_node(MODALITY, "--roles", "store,query")
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
    finally:
        v.close()
    server = start_server(vault)
    try:
        yield Site(vault, server, token, root)
    finally:
        server.stop()


# --- building objects ----------------------------------------------------------------------


def _dataset(**attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PV-" + uuid.uuid4().hex[:8]
    ds.PatientName = "Valid^Patient"
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = generate_uid()
    return ds


def _us_patient_name() -> Dataset:
    """PatientName encoded as two unsigned shorts: what broke OHIF for everyone."""
    ds = _dataset()
    del ds.PatientName
    ds.add(DataElement(0x00100010, "US", [513, 8195]))
    return ds


def _explicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _part10(ds: Dataset, body: bytes) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + body


def _bomb_bytes(inflated_mib: int) -> tuple[bytes, Dataset]:
    """A Deflated Explicit VR LE object whose pixel data is ``inflated_mib`` MiB of zeros:
    about a thousand times smaller on the wire than in memory."""
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    size = inflated_mib * 1024 * 1024
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(_explicit_le(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0,
                                                        size))]
    zeros = bytes(1024 * 1024)
    out += [comp.compress(zeros) for _ in range(inflated_mib)]
    out.append(comp.flush())
    return _part10(ds, b"".join(out)), ds


def _send(site: Site, what: Dataset | Path, syntax: str = ExplicitVRLittleEndian) -> int:
    """C-STORE one dataset (or a file, streamed as it is) with pynetdicom; the status."""
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", site.server.port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = isinstance(what, Path)
    try:
        status = assoc.send_c_store(what)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    assert "Status" in status, "no C-STORE response"
    return int(status.Status)


def _stow(site: Site, raw: bytes) -> httpx.Response:
    boundary = "pv-" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw
            + f"\r\n--{boundary}--\r\n".encode())
    with site.http() as http:
        return http.post(f"{site.url}/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})


def _studies(site: Site, **params: str) -> tuple[httpx.Response, float]:
    with site.http() as http:
        start = time.monotonic()
        response = http.get(f"{site.url}/studies", params=params,
                            headers={"Accept": "application/dicom+json"})
        return response, time.monotonic() - start


def _valid_for_ohif(answers: list[dict[str, Any]]) -> None:
    for answer in answers:
        name = answer.get("00100010")
        assert name is not None and name["vr"] == "PN", name
        for value in name.get("Value", []):
            assert isinstance(value, dict), name


# --- defect 3: a mismatched VR ---------------------------------------------------------------


def test_c_store_with_patient_name_as_us_is_refused_with_a_clear_reason(site: Site) -> None:
    good = _dataset()
    assert _send(site, good) == 0x0000
    bad = _us_patient_name()
    assert _send(site, bad) == 0xC000
    failed = [e for e in events(site.vault, "dicom.store.failed") if e["ae"] == MODALITY]
    assert failed, "the refusal is not in the trail"
    message = str(failed[-1]["message"])
    assert "C000" in message and "(0010,0010)" in message and "VR US" in message, message
    # The study list still answers, with valid person names, and lists the good study.
    response, _ = _studies(site)
    assert response.status_code == 200, response.text
    answers = response.json()
    _valid_for_ohif(answers)
    uids = {a["0020000D"]["Value"][0] for a in answers}
    assert str(good.StudyInstanceUID) in uids
    assert str(bad.StudyInstanceUID) not in uids


def test_stow_with_patient_name_as_us_is_refused(site: Site) -> None:
    bad = _us_patient_name()
    response = _stow(site, _part10(bad, _explicit_le(bad)))
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xC000]


def test_stored_mismatched_vrs_are_healed_in_answers() -> None:
    """A header stored before the check (the index holds its DICOM JSON as it was) is
    answered valid for the dictionary or not at all."""
    stored = {
        "00100010": {"vr": "US", "Value": [513, 8195]},
        "00100020": {"vr": "LO", "Value": ["ID-1"]},
        "00080080": {"vr": "SH", "Value": ["Clinic"]},  # LO in the dictionary: relabelled
        "00280030": {"vr": "FD", "Value": [0.5, 0.5]},  # DS: relabelled
        "00280106": {"vr": "SS", "Value": [-3]},  # US or SS: allowed as is
        "00091010": {"vr": "US", "Value": [1]},  # private: left alone
        "00081140": {"vr": "SQ", "Value": [{"00081155": {"vr": "US", "Value": [7]}}]},
    }
    out = vr_check.sanitise(stored)
    assert "00100010" not in out
    assert out["00100020"] == stored["00100020"]
    assert out["00080080"] == {"vr": "LO", "Value": ["Clinic"]}
    assert out["00280030"] == {"vr": "DS", "Value": [0.5, 0.5]}
    assert out["00280106"] == stored["00280106"]
    assert out["00091010"] == stored["00091010"]
    assert out["00081140"] == {"vr": "SQ", "Value": [{}]}
    assert vr_check.entry_ok("00100010", {"vr": "PN"})
    assert not vr_check.entry_ok("00100010", {"vr": "US", "Value": [1]})


def test_old_mismatched_header_is_answered_valid_by_qido(tmp_path: Path) -> None:
    """An object indexed before the fix (its stored JSON rewritten to what it was then)
    no longer reaches QIDO's answers raw."""
    from sqlalchemy import select, update

    from pacsvault.index.models import Instance, Patient, Series, Study
    from pacsvault.web import qido

    vault_dir = make_vault(tmp_path / "v")
    vault = vault_dir.open()
    try:
        ds = _dataset()
        vault.archive.store(_part10(ds, _explicit_le(ds)))
        with vault.sessions.begin() as session:
            for model in (Patient, Study, Series, Instance):
                row = session.scalars(select(model.meta_json)).first()
                meta = json.loads(row or "{}")
                meta["00100010"] = {"vr": "US", "Value": [513, 8195]}
                session.execute(update(model).values(meta_json=json.dumps(meta)))
        for level in ("STUDY", "SERIES", "IMAGE"):
            query = qido.parse([("includefield", "all")], level)
            result = qido.search(vault, query, "https://localhost/dicom-web")
            assert len(result.answers) == 1
            _valid_for_ohif(result.answers)
        from pacsvault.web import wado

        (item,) = wado.locate(vault, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                              str(ds.SOPInstanceUID), with_meta=True)
        metadata = wado.metadata(vault, item, "https://localhost/dicom-web/x")
        assert "00100010" not in metadata and metadata["00100020"]["vr"] == "LO"
    finally:
        vault.close()


# --- defect 4: wildcards ------------------------------------------------------------------------


def _reference(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def test_wildcard_matcher_agrees_with_a_reference() -> None:
    rng = random.Random(11)
    for _ in range(20000):
        value = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        pattern = "".join(rng.choice("ab*?") for _ in range(rng.randint(0, 7)))
        assert matching.wildcard_match(pattern, value) == _reference(pattern, value), (
            pattern, value)
    for pattern, value in [("", ""), ("*", ""), ("?", ""), ("a**b", "ab"), ("*.*", "x.y"),
                           ("%_\\", "%_\\"), ("Ã*", "Ãé")]:
        assert matching.wildcard_match(pattern, value) == _reference(pattern, value)


def test_wildcard_matcher_is_not_exponential() -> None:
    start = time.monotonic()
    assert not matching.wildcard_match("*a" * 40 + "*b", "a" * 2000)
    assert matching.wildcard_match("*a" * 40 + "*", "a" * 2000)
    assert time.monotonic() - start < 2.0


def _cfind(site: Site, **keys: str) -> tuple[list[int], float]:
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", site.server.port, ae_title=ARCHIVE_AE)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    for key, value in keys.items():
        setattr(identifier, key, value)
    statuses: list[int] = []
    start = time.monotonic()
    try:
        for status, _answer in assoc.send_c_find(identifier,
                                                 StudyRootQueryRetrieveInformationModelFind):
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        elapsed = time.monotonic() - start
        assoc.release()
    return statuses, elapsed


def test_pathological_wildcard_answers_fast_while_echo_stays_fast(site: Site) -> None:
    ds = _dataset()
    # LO allows 64 characters: an attacker sends 200 anyway (STOW or C-STORE)
    ds.add(DataElement(0x00080080, "LO", "a" * 200))  # InstitutionName: no index column
    ds.add(DataElement(0x00081030, "LO", "a" * 200))  # StudyDescription: SQL LIKE
    assert _send(site, ds) == 0x0000
    echoes: list[float] = []
    stop = threading.Event()

    def echo_loop() -> None:
        while not stop.is_set() and len(echoes) < 50:
            start = time.monotonic()
            assert echoscu(site.server.port, calling=MODALITY).returncode == 0
            echoes.append(time.monotonic() - start)

    pinger = threading.Thread(target=echo_loop)
    pinger.start()
    try:
        response, qido_time = _studies(site, InstitutionName=EVIL_STARS)
        indexed, indexed_time = _studies(site, StudyDescription=EVIL_STARS)
        statuses, find_time = _cfind(site, InstitutionName=EVIL_STARS)
        matched, _ = _cfind(site, InstitutionName="*a*a*a*a*a*a*")
    finally:
        stop.set()
        pinger.join(60)
    assert response.status_code == 200 and response.json() == []
    assert indexed.status_code == 200 and indexed.json() == []
    assert statuses == [0x0000]
    assert matched.count(0xFF00) == 1 and matched[-1] == 0x0000
    assert qido_time < 3.0 and indexed_time < 3.0 and find_time < 3.0, (
        qido_time, indexed_time, find_time)
    assert echoes and max(echoes) < 3.0, echoes


def test_query_over_its_time_budget_stops_and_is_audited(tmp_path: Path) -> None:
    """A budget no query can meet: C-FIND ends with A700, QIDO-RS with 413, both recorded."""
    vault = make_vault(tmp_path / "v")
    vault.add_node(MODALITY, "--roles", "store,query")
    vault.set_toml("query", "time_budget_seconds", "0.000001")
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
    finally:
        v.close()
    server = start_server(vault)
    try:
        hurried = Site(vault, server, token, tmp_path)
        assert _send(hurried, _dataset(InstitutionName="x" * 60)) == 0x0000
        statuses, _ = _cfind(hurried, InstitutionName="*x*")
        response, _ = _studies(hurried, InstitutionName="*x*")
    finally:
        server.stop()
    assert statuses == [0xA700]
    assert response.status_code == 413 and "time budget" in response.json()["error"]
    finds = events(vault, "dicom.find")
    assert finds and "time budget" in str(finds[-1]["message"])
    searches = events(vault, "dicomweb.search")
    assert searches and searches[-1]["status"] == 413


# --- defect 5: deflate bombs ---------------------------------------------------------------------


def test_inflate_is_bounded() -> None:
    raw, _ = _bomb_bytes(8)
    with pytest.raises(inflate.InflateLimitExceeded):
        inflate.read(raw, limit=4 * 1024 * 1024)
    ds = inflate.read(raw, limit=16 * 1024 * 1024)
    assert len(ds.PixelData) == 8 * 1024 * 1024
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    normal = Path(cast(str, get_testdata_file("image_dfl.dcm")))
    assert inflate.read(normal.read_bytes(), limit=16 * 1024 * 1024).Rows == 512


def test_read_paths_of_a_stored_bomb_are_bounded() -> None:
    """A bomb stored before the fix: rendered/frames/bulk reads (``wado.read_dataset``),
    retrieve and STOW headers all parse through ``parse.read``/``inflate.read``."""
    from pacsvault.dicomfile import parse
    from pacsvault.web import wado

    raw, _ = _bomb_bytes(8)
    previous = inflate.limit()
    inflate.set_limit(4 * 1024 * 1024)
    try:
        with pytest.raises(wado.WadoError) as caught:
            wado.read_dataset(raw)
        assert caught.value.status == 413
        with pytest.raises(parse.ObjectTooLarge):
            parse.read(raw, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    finally:
        inflate.set_limit(previous)


def test_deflate_bomb_is_refused_with_bounded_memory(site: Site) -> None:
    raw, bomb = _bomb_bytes(BOMB_MIB)
    path = site.root / "bomb.dcm"
    path.write_bytes(raw)
    assert len(raw) < 2 * 1024 * 1024
    server = psutil.Process(site.server.proc.pid)
    baseline = server.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status = _send(site, path, DeflatedExplicitVRLittleEndian)
    finally:
        done.set()
        sampler.join(10)
    assert status == 0xA700
    growth_mib = (peak[0] - baseline) / 2**20
    assert growth_mib < 200, f"server grew by {growth_mib:.0f} MiB"
    failed = [e for e in events(site.vault, "dicom.store.failed")
              if "A700" in str(e["message"])]
    assert failed and "max_inflated_mb" in str(failed[-1]["message"])
    # the STOW door too
    response = _stow(site, raw)
    assert response.status_code == 409, response.text
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert str(bomb.StudyInstanceUID) not in {
        a["0020000D"]["Value"][0] for a in _studies(site)[0].json()}


def test_normal_deflated_image_stores_and_renders(site: Site) -> None:
    source = Path(cast(str, get_testdata_file("image_dfl.dcm")))
    result = storescu(site.server.port, [source], calling=MODALITY, extra=("-xd",))
    assert result.returncode == 0, result.stderr
    ds = dcmread(source)
    base = (f"{site.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    with site.http() as http:
        rendered = http.get(f"{base}/rendered", headers={"Accept": "image/png"})
        assert rendered.status_code == 200, rendered.text
        assert rendered.content.startswith(b"\x89PNG")
        frames = http.get(f"{base}/frames/1", headers={
            "Accept": 'multipart/related; type="application/octet-stream"'})
        assert frames.status_code == 200, frames.text
        assert len(frames.content) > 512 * 512


def test_query_contexts_do_not_accept_deflate(site: Site) -> None:
    """pynetdicom inflates a deflated C-FIND/C-MOVE/C-GET identifier with one unbounded
    ``zlib.decompress``: those contexts accept only Implicit/Explicit VR Little Endian
    (identifiers are small; deflating them gains nothing)."""
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind,
                             DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.server.port, ae_title=ARCHIVE_AE)
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    finally:
        if assoc.is_established:
            assoc.release()
    assert str(CTImageStorage) in accepted  # deflated images: bounded by max_inflated_mb
    assert str(StudyRootQueryRetrieveInformationModelFind) not in accepted

