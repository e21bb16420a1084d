"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against the real server, with ``dicomweb-client``.

One vault and one server serve the module. The 13-file corpus (one study per distinctive
patient, every transfer syntax of the foundation corpus) is pushed over DICOM with dcmtk
``storescu`` first; a physician and an auditor get API tokens in-process. Everything goes
over HTTPS to 127.0.0.1, verified against the vault's CA (``trust_env`` off, so no proxy and
no CA bundle from the environment gets in the way).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from pacsvault.web import dicomweb
from tests import corpus
from tests.harness.backends import Backend
from tests.helpers import Server, VaultDir, events, start_server, storescu

pytestmark = pytest.mark.slow

MODALITY = "MODALITY"
PHYSICIAN, PHYSICIAN_PW = "drmartin", "quiet-harbour-lantern-47-violet-orchard"
AUDITOR, AUDITOR_PW = "mmeaudit", "copper-meadow-falcon-93-silent-river"
TRAILING_PADDING = 0xFFFCFFFC
FAKE_UID = "1.2.3.4.5"
MR_LOSSLESS = ("MR_small_jpeg_ls_lossless", "MR_small_jp2klossless", "MR_small_RLE")
DUPLICATE_SOP = 0x0111
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass
class Env:
    vault: VaultDir
    server: Server
    files: list[corpus.CorpusFile]
    token: str
    auditor_token: str
    root: Path
    sessions: list[requests.Session] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.https_port}/dicom-web"

    @property
    def ca(self) -> str:
        return str(self.vault.data / "tls" / "ca.crt")

    def session(self, token: str | None = None) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify; no proxies either
        s.verify = self.ca
        self.sessions.append(s)  # closed before the server stops (keep-alive would delay it)
        if token:
            s.headers["Authorization"] = f"Bearer {token}"
        return s

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.url, session=self.session(self.token))

    def by_name(self, name: str) -> corpus.CorpusFile:
        return next(f for f in self.files if name in f.path.name)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Env]:
    """Once per index backend (issue 16): embedded, then sealed PostgreSQL."""
    root = tmp_path_factory.mktemp("dicomweb")
    vault = backend.make_vault(root / "v")
    vault.add_node(MODALITY)
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        v.accounts.add_user(AUDITOR, ["auditor"], AUDITOR_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
        auditor_token = v.accounts.create_token(AUDITOR, "1d").token
    finally:
        v.close()
    server = start_server(vault)
    try:
        files = corpus.build(root / "corpus")
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(
                lambda f: storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal),
                files))
        for f, res in zip(files, results, strict=True):
            assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"
        env = Env(vault, server, files, token, auditor_token, root)
        yield env
        for session in env.sessions:
            session.close()
    finally:
        server.stop()


# --- helpers -----------------------------------------------------------------------------------


def _uids(f: corpus.CorpusFile) -> tuple[str, str, str]:
    ds = dcmread(f.path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _assert_same(original_path: Path, back: Dataset, *, name: str = "") -> None:
    """Identical to what was sent, but for the trailing padding storescu drops."""
    original = dcmread(original_path)
    label = name or original_path.name
    assert back.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, label
    for ds in (original, back):
        if TRAILING_PADDING in ds:
            del ds[TRAILING_PADDING]
    assert [e.tag for e in back] == [e.tag for e in original], label
    for elem in original:
        assert back[elem.tag].value == elem.value, f"{label} {elem.tag}"


def _value(answer: dict[str, Any], tag: str) -> Any:
    values = answer.get(tag, {}).get("Value") or [None]
    return values[0]


def _name(answer: dict[str, Any]) -> str:
    value = _value(answer, "00100010")
    return str(value["Alphabetic"]) if value else ""


def _multipart_body(datasets: list[Dataset], boundary: str = "pvtestboundary") -> bytes:
    out = io.BytesIO()
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(buf.getvalue())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def _parts(res: requests.Response) -> list[bytes]:
    """The parts of a multipart/related answer (RFC 2046 framing, checked)."""
    assert res.status_code == 200, res.status_code
    boundary = re.search(r"boundary=\"?([^\";]+)", res.headers["content-type"])
    assert boundary is not None
    dash = b"--" + boundary.group(1).encode()
    body = res.content
    end = b"\r\n" + dash + b"--\r\n"
    assert body.startswith(dash) and body.endswith(end)
    return [chunk.partition(b"\r\n\r\n")[2]
            for chunk in body[len(dash):-len(end)].split(b"\r\n" + dash)]


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=pvtestboundary'


def _fresh_ct(env: Env, *, study: str | None = None) -> Dataset:
    ds = dcmread(env.by_name("CT_small").path)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _count_instances(env: Env, sop_uid: str) -> int:
    return len(env.client().search_for_instances(search_filters={"SOPInstanceUID": sop_uid}))


# --- QIDO-RS -----------------------------------------------------------------------------------


def test_search_studies_wildcard_date_range_and_utf8(env: Env) -> None:
    client = env.client()
    everything = client.search_for_studies()
    assert len(everything) == len(env.files)
    # dicomweb-client percent-encodes '*' (quetzal%2A): the server decodes before matching,
    # and person names match case-insensitively.
    quetzal = client.search_for_studies(search_filters={"PatientName": "quetzal*"})
    assert sorted(_name(a) for a in quetzal) == sorted(
        f.patient_name for f in env.files if f.patient_name.startswith("Quetzal"))
    one = client.search_for_studies(search_filters={"00100010": "Zorglub^Hél*"})
    assert [_name(a) for a in one] == ["Zorglub^Hélène01"]
    dates = {f.study_uid: str(dcmread(f.path, stop_before_pixels=True).get("StudyDate", ""))
             for f in env.files}
    in_2004 = client.search_for_studies(search_filters={"StudyDate": "20040101-20041231"})
    assert {_value(a, "0020000D") for a in in_2004} == {
        uid for uid, d in dates.items() if d.startswith("2004")}
    open_range = client.search_for_studies(search_filters={"StudyDate": "20160101-"})
    assert {_value(a, "0020000D") for a in open_range} == {
        uid for uid, d in dates.items() if d >= "20160101"}
    # default study attributes (PS3.18 table 10.6.3-3) and the links
    ct = env.by_name("CT_small")
    [answer] = client.search_for_studies(search_filters={"PatientID": ct.patient_id})
    for tag in ("00080020", "00080050", "00080056", "00080061", "00080090", "00081190",
                "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010",
                "00201206", "00201208"):
        assert tag in answer, tag
    assert _value(answer, "00201208") == 1 and _value(answer, "00080061") == "CT"
    assert _value(answer, "00081190") == f"{env.url}/studies/{ct.study_uid}"
    assert client.search_for_studies(search_filters={"PatientName": "NOBODY*"}) == []


def test_search_series_and_instances(env: Env) -> None:
    client = env.client()
    ct = env.by_name("CT_small")
    study, series, sop = _uids(ct)
    [s] = client.search_for_series(study)
    assert _value(s, "0020000E") == series and _value(s, "00080060") == "CT"
    assert _value(s, "00201209") == 1
    assert _value(s, "00081190") == f"{env.url}/studies/{study}/series/{series}"
    [outside] = client.search_for_series(search_filters={"SeriesInstanceUID": series},
                                         fields=["SOPClassesInStudy"])
    assert _value(outside, "00080062") == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert _value(outside, "00201208") == 1 and _value(outside, "00080061") == "CT"
    mr = client.search_for_series(search_filters={"Modality": "MR", "PatientName": "QUET*"})
    assert {_value(a, "0020000D") for a in mr} == {
        f.study_uid for f in env.files if f.patient_name.startswith("Quetzal")
        and dcmread(f.path, stop_before_pixels=True).get("Modality") == "MR"}
    assert len(mr) == 3
    assert all(_value(a, "00100010") for a in mr)  # study attributes outside a study
    [i] = client.search_for_instances(study, series)
    assert _value(i, "00080018") == sop and _value(i, "00280010") == 128
    assert _value(i, "00081190") == f"{env.url}/studies/{study}/series/{series}/instances/{sop}"
    [i2] = client.search_for_instances(study)
    assert _value(i2, "00080018") == sop and _value(i2, "0020000E") == series
    ranged = client.search_for_instances(
        search_filters={"StudyDate": "20040101-20041231", "Modality": "CT"})
    assert [_value(a, "00080018") for a in ranged] == [sop]
    wide = client.search_for_instances(fields=["all"], limit=1, offset=0, fuzzymatching=False,
                                       search_filters={"SOPInstanceUID": sop})
    assert _value(wide[0], "00180050") is not None  # SliceThickness: only with "all"
    assert "7FE00010" not in wide[0]
    paged = [_value(a, "0020000D") for n in range(3)
             for a in client.search_for_studies(limit=5, offset=5 * n)]
    assert len(paged) == len(set(paged)) == len(env.files)
    listed = client.search_for_studies(fields=["StudyDescription", "00081030"],
                                       search_filters={"PatientID": ct.patient_id})
    assert "00081030" in listed[0]


def test_search_refusals(env: Env) -> None:
    s = env.session(env.token)
    for query in ("NoSuchKeyword=1", "00091010=x", "limit=-1", "offset=abc",
                  "fuzzymatching=maybe", "Rows=abc"):
        res = s.get(f"{env.url}/studies?{query}")
        assert res.status_code == 400, query
    assert s.get(f"{env.url}/studies/not-a-uid/series").status_code == 400
    fuzzy = s.get(f"{env.url}/studies?fuzzymatching=true&limit=1")
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["Warning"]
    more = s.get(f"{env.url}/studies?limit=2")
    assert len(more.json()) == 2 and "additional results" in more.headers["Warning"]
    raw = s.get(f"{env.url}/studies?PatientName=QUETZAL%5EBARTH%2A&limit=100")
    assert len(raw.json()) == 12
    assert s.get(f"{env.url}/studies", headers={"Accept": "application/dicom+xml"}
                 ).status_code == 406


# --- WADO-RS -----------------------------------------------------------------------------------


def test_retrieve_identical_for_every_transfer_syntax(env: Env) -> None:
    client = env.client()
    for f in env.files:
        study, series, sop = _uids(f)
        _assert_same(f.path, client.retrieve_instance(study, series, sop))
        [from_series] = client.retrieve_series(study, series)
        _assert_same(f.path, from_series)
        [from_study] = client.retrieve_study(study)
        _assert_same(f.path, from_study)
        assert from_study.file_meta.TransferSyntaxUID == f.transfer_syntax


def test_retrieve_transcodes_only_losslessly(env: Env) -> None:
    client = env.client()
    rle = env.by_name("MR_small_RLE")
    implicit = dcmread(env.by_name("MR_small_implicit").path)
    study, series, sop = _uids(rle)
    back = client.retrieve_instance(
        study, series, sop, media_types=(("application/dicom", ExplicitVRLittleEndian),))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == sop and back.PixelData == implicit.PixelData
    ct = env.by_name("CT_small")
    ct_study, ct_series, ct_sop = _uids(ct)
    res = env.session(env.token).get(
        f"{env.url}/studies/{ct_study}/series/{ct_series}/instances/{ct_sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; '
                           f"transfer-syntax={ImplicitVRLittleEndian}"})
    [part] = _parts(res)
    back = dcmread(io.BytesIO(part))
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.PixelData == dcmread(ct.path).PixelData
    # a compressed syntax we do not hold: 406, never a lossy re-encoding
    res = env.session(env.token).get(
        f"{env.url}/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; '
                           "transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert res.status_code == 406
    missing = env.session(env.token).get(f"{env.url}/studies/{FAKE_UID}")
    assert missing.status_code == 404


def test_metadata_from_the_index_with_bulk_data_uris(env: Env) -> None:
    client = env.client()
    for f in env.files:
        study, series, sop = _uids(f)
        original = dcmread(f.path)
        meta = client.retrieve_instance_metadata(study, series, sop)
        for keyword in ("PatientID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated"):
            elem = original[keyword]
            assert _value(meta, f"{elem.tag:08X}") == elem.value, f"{f.path.name} {keyword}"
        assert _value(meta, "00083002") == f.transfer_syntax
        pixel_uri = meta["7FE00010"]["BulkDataURI"]
        assert pixel_uri == (f"{env.url}/studies/{study}/series/{series}/instances/{sop}"
                             "/bulkdata/7FE00010")
        if f.transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            assert client.retrieve_bulkdata(pixel_uri) == [original.PixelData]
    ct = env.by_name("CT_small")
    [study_meta] = client.retrieve_study_metadata(ct.study_uid)
    assert _value(study_meta, "00080018") == ct.sop_uid
    [series_meta] = client.retrieve_series_metadata(*_uids(ct)[:2])
    assert series_meta == study_meta


def test_frames_default_accept_octet_stream_and_uncompressed(env: Env) -> None:
    client = env.client()
    reference = dcmread(env.by_name("MR_small_implicit").path).PixelData
    for f in env.files:
        study, series, sop = _uids(f)
        original = dcmread(f.path)
        count = int(original.get("NumberOfFrames", 1) or 1)
        numbers = [1] if count == 1 else [1, count // 2, count]
        compressed = original.file_meta.TransferSyntaxUID.is_compressed
        if compressed:
            stored = [get_frame(original.PixelData, n - 1, number_of_frames=count)
                      for n in numbers]
        else:
            size = len(original.PixelData) // count
            stored = [original.PixelData[(n - 1) * size:n * size] for n in numbers]
        # dicomweb-client's default Accept (multipart/related; type="*/*")
        assert client.retrieve_instance_frames(study, series, sop, numbers) == stored, f.path
        # what OHIF / Cornerstone ask: octet-stream, any transfer syntax
        assert client.retrieve_instance_frames(
            study, series, sop, numbers,
            media_types=(("application/octet-stream", "*"),)) == stored, f.path
        # octet-stream without a syntax: uncompressed pixels (decoded when needed)
        native = client.retrieve_instance_frames(
            study, series, sop, numbers[:1], media_types=("application/octet-stream",))
        samples = 3 if int(original.SamplesPerPixel) == 3 else 1
        bytes_per = 2 if int(original.BitsAllocated) > 8 else 1
        expected_size = int(original.Rows) * int(original.Columns) * samples * bytes_per
        assert len(native[0]) == expected_size, f.path
        if not compressed:
            assert native == stored[:1]
        if any(name in f.path.name for name in MR_LOSSLESS):
            assert native[0] == reference, f.path  # lossless: same pixels as the original
    jpeg = env.by_name("SC_rgb_jpeg_dcmtk")
    res = env.session(env.token).get(
        f"{env.url}/studies/{'/series/'.join(_uids(jpeg)[:2])}/instances/{jpeg.sop_uid}"
        "/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert res.status_code == 200
    assert res.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    assert b"transfer-syntax=1.2.840.10008.1.2.4.50" in res.content
    refused = env.session(env.token).get(
        res.url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert refused.status_code == 406
    too_far = env.session(env.token).get(res.url.replace("/frames/1", "/frames/2"))
    assert too_far.status_code == 404


def test_rendered_and_thumbnails_for_every_transfer_syntax(env: Env) -> None:
    client = env.client()
    s = env.session(env.token)
    for f in env.files:
        study, series, sop = _uids(f)
        original = dcmread(f.path, stop_before_pixels=True)
        jpeg = client.retrieve_instance_rendered(study, series, sop)
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG", f.path
        assert image.size == (int(original.Columns), int(original.Rows)), f.path
        png = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
        assert Image.open(io.BytesIO(png)).format == "PNG"
        frame = client.retrieve_instance_frames_rendered(study, series, sop, [1])
        assert Image.open(io.BytesIO(frame)).format == "JPEG"
        thumb = s.get(f"{env.url}/studies/{study}/series/{series}/instances/{sop}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 128
    ct = env.by_name("CT_small")
    study, series, sop = _uids(ct)
    base = f"{env.url}/studies/{study}/series/{series}/instances/{sop}/rendered"

    def grey(params: str) -> Any:
        res = s.get(f"{base}?{params}", headers={"Accept": "image/png"})
        assert res.status_code == 200, params
        return np.asarray(Image.open(io.BytesIO(res.content)))

    soft, bone = grey("window=40,400"), grey("window=300,1500,linear")
    assert not np.array_equal(soft, bone)
    narrow = grey("window=1000,1,linear")
    assert set(np.unique(narrow)) <= {0, 255}
    assert grey("window=40,400&viewport=64,64").shape == (64, 64)
    for bad in ("window=40", "window=a,b", "window=40,400,cubic", "viewport=0,10",
                "quality=500"):
        assert s.get(f"{base}?{bad}").status_code == 400, bad
    assert s.get(base, headers={"Accept": "image/gif"}).status_code == 406
    for thumb_url in (f"{env.url}/studies/{study}/thumbnail",
                      f"{env.url}/studies/{study}/series/{series}/thumbnail"):
        assert s.get(thumb_url).headers["content-type"] == "image/jpeg"


# --- STOW-RS ------------------------------------------------------------------------------------


def test_store_then_retrieve_identical(env: Env, tmp_path: Path) -> None:
    # small chunks: dicomweb-client then sends the body with chunked transfer encoding
    client = DICOMwebClient(url=env.url, session=env.session(env.token), chunk_size=16384)
    first, second = _fresh_ct(env), _fresh_ct(env)
    second.StudyInstanceUID = first.StudyInstanceUID
    # a bulk element outside pixel data, and one inside a sequence
    first.add_new(0x00420011, "OB", bytes(range(256)) * 20)
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.add_new(0x7FE00010, "OB", bytes(64 * 64))
    first.IconImageSequence = [icon]
    result = client.store_instances([first, second])
    stored = [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence]
    assert stored == [first.SOPInstanceUID, second.SOPInstanceUID]
    assert "FailedSOPSequence" not in result
    assert result.RetrieveURL == f"{env.url}/studies/{first.StudyInstanceUID}"
    for ds in (first, second):
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = client.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                        str(ds.SOPInstanceUID))
        _assert_same(path, back)
    meta = client.retrieve_instance_metadata(str(first.StudyInstanceUID),
                                             str(first.SeriesInstanceUID),
                                             str(first.SOPInstanceUID))
    assert client.retrieve_bulkdata(meta["00420011"]["BulkDataURI"]) == [first[0x00420011].value]
    icon_uri = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_uri.endswith("/bulkdata/00880200/0/7FE00010")
    assert client.retrieve_bulkdata(icon_uri) == [bytes(64 * 64)]
    # byte-identical re-send: success, nothing new
    again = client.store_instances([first])
    assert [str(i.ReferencedSOPInstanceUID) for i in again.ReferencedSOPSequence] == [
        first.SOPInstanceUID]
    assert _count_instances(env, str(first.SOPInstanceUID)) == 1


def test_store_conflicts_mismatches_and_status_codes(env: Env, tmp_path: Path) -> None:
    s = env.session(env.token)
    kept = _fresh_ct(env)
    s.post(f"{env.url}/studies", data=_multipart_body([kept]),
           headers={"Content-Type": STOW_TYPE}).raise_for_status()
    changed = copy.deepcopy(kept)
    changed.PatientWeight = 77
    res = s.post(f"{env.url}/studies", data=_multipart_body([changed]),
                 headers={"Content-Type": STOW_TYPE})
    assert res.status_code == 409
    answer = Dataset.from_json(res.json())
    [failed] = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == kept.SOPInstanceUID
    assert failed.FailureReason == DUPLICATE_SOP
    path = tmp_path / "kept.dcm"
    kept.save_as(path, enforce_file_format=True)
    _assert_same(path, env.client().retrieve_instance(
        str(kept.StudyInstanceUID), str(kept.SeriesInstanceUID), str(kept.SOPInstanceUID)))
    # some stored, some not: 202 with both sequences
    new = _fresh_ct(env)
    res = s.post(f"{env.url}/studies", data=_multipart_body([new, changed]),
                 headers={"Content-Type": STOW_TYPE})
    assert res.status_code == 202
    answer = Dataset.from_json(res.json())
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        new.SOPInstanceUID]
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [DUPLICATE_SOP]
    # /studies/{study}: an instance of another study is refused
    other = _fresh_ct(env)
    res = s.post(f"{env.url}/studies/{kept.StudyInstanceUID}", data=_multipart_body([other]),
                 headers={"Content-Type": STOW_TYPE})
    assert res.status_code == 409
    assert Dataset.from_json(res.json()).FailedSOPSequence[0].FailureReason == DOES_NOT_MATCH
    assert _count_instances(env, str(other.SOPInstanceUID)) == 0
    # something that is not DICOM at all
    junk = (b"--pvtestboundary\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n"
            b"--pvtestboundary--\r\n")
    res = s.post(f"{env.url}/studies", data=junk, headers={"Content-Type": STOW_TYPE})
    assert res.status_code == 409
    assert Dataset.from_json(res.json()).FailedSOPSequence[0].FailureReason == CANNOT_UNDERSTAND
    res = s.post(f"{env.url}/studies", data=_multipart_body([other]),
                 headers={"Content-Type": "application/dicom"})
    assert res.status_code == 415


def test_truncated_upload_stores_nothing(env: Env) -> None:
    s = env.session(env.token)
    a, b = _fresh_ct(env), _fresh_ct(env)
    body = _multipart_body([a, b])
    # complete HTTP body, multipart cut inside the second instance
    res = s.post(f"{env.url}/studies", data=body[: len(body) - 3000],
                 headers={"Content-Type": STOW_TYPE})
    assert res.status_code == 400
    # the client goes away in the middle of the body
    ctx = ssl.create_default_context(cafile=env.ca)
    with socket.create_connection(("127.0.0.1", env.server.https_port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {env.token}\r\nContent-Type: {STOW_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        tls.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any("interrupted" in str(e["message"]) for e in events(env.vault, "dicomweb.store")):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the interrupted upload was not recorded")
    for ds in (a, b):
        assert _count_instances(env, str(ds.SOPInstanceUID)) == 0


# --- access control -----------------------------------------------------------------------------


def _route_urls(env: Env) -> list[tuple[str, str]]:
    """Every DICOMweb route, with placeholder UIDs filled in."""
    fill = {"study": FAKE_UID, "series": FAKE_UID, "sop": FAKE_UID, "frames": "1",
            "path": "7FE00010"}
    out = []
    for route in dicomweb.router.routes:
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: fill[m.group(1)], route.path)  # type: ignore[attr-defined]
        for method in sorted(route.methods):  # type: ignore[attr-defined]
            out.append((method, f"https://127.0.0.1:{env.server.https_port}{path}"))
    return out


def test_every_route_requires_a_physician(env: Env) -> None:
    routes = _route_urls(env)
    assert len(routes) == 22
    anonymous, auditor = env.session(), env.session(env.auditor_token)
    physician = env.session(env.token)
    # one forged token only: unknown tokens count against the source address (throttling)
    assert env.session("pv_" + "0" * 40).get(f"{env.url}/studies").status_code == 401
    for method, url in routes:
        body = {"data": b"x", "headers": {"Content-Type": STOW_TYPE}} if method == "POST" else {}
        res = anonymous.request(method, url, **body)  # type: ignore[arg-type]
        assert res.status_code == 401, (method, url, res.status_code)
        res = auditor.request(method, url, **body)  # type: ignore[arg-type]
        assert res.status_code == 403, (method, url, res.status_code)
        res = physician.request(method, url, **body)  # type: ignore[arg-type]
        assert res.status_code not in (401, 403), (method, url, res.status_code)
        assert res.headers["Cache-Control"] == "no-store"


# --- events --------------------------------------------------------------------------------------


def test_requests_are_recorded_without_patient_data(env: Env) -> None:
    client = env.client()
    ct = env.by_name("CT_small")
    study, series, sop = _uids(ct)
    client.search_for_studies(search_filters={"StudyInstanceUID": study})
    client.retrieve_instance(study, series, sop)
    searches = events(env.vault, "dicomweb.search")
    last = searches[-1]
    assert last["code"] == "110112" and last["user"] == PHYSICIAN
    assert last["address"] == "127.0.0.1" and last["matches"] == 1
    assert last["study_uids"] == [ct.study_uid] and last["patient_ids"] == [ct.patient_id]
    retrieves = events(env.vault, "dicomweb.retrieve")
    assert retrieves[-1]["code"] == "110103" and retrieves[-1]["study_uids"] == [study]
    assert retrieves[-1]["sop_uids"] == [sop] and retrieves[-1]["user"] == PHYSICIAN
    resources = {e["resource"] for e in retrieves}
    assert {"instance", "series", "study", "metadata", "frames", "rendered", "thumbnail",
            "bulkdata"} <= resources
    stores = events(env.vault, "dicomweb.store")
    assert {e["code"] for e in stores} == {"110107"}
    assert any(e["stored"] and e["study_uids"] for e in stores)
    assert any("0111" in str(e.get("reasons", "")) for e in stores)
    conflicts = events(env.vault, "dicomweb.store.conflict")
    assert conflicts and all(e["code"] == "110113" and e["sop_uids"] for e in conflicts)
    # names, IDs and birth dates never in clear: not in messages, details or the log
    secrets = corpus.secrets_of(env.files)
    for e in itertools.chain(searches, retrieves, stores, conflicts):
        clear = json.dumps({k: v for k, v in e.items()
                            if k not in ("study_uids", "sop_uids", "patient_ids")},
                           default=str, ensure_ascii=False)
        assert not [s for s in secrets if s in clear], e["action"]
    log = env.server.log()
    assert not [s for s in secrets if s in log]


def test_no_patient_data_at_rest_after_dicomweb(env: Env) -> None:
    """After searches, retrievals, renderings and stores over DICOMweb: the data dir, the
    key dir and the server's temp dir hold no name, ID or birth date in any encoding."""
    needles = [
        value.encode(enc)
        for value in corpus.secrets_of(env.files)
        for enc in ("utf-8", "utf-16-le", "utf-16-be")
    ]
    hits = []
    for root in (env.vault.data, env.vault.key.parent, env.server.tmpdir):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits += [f"{path}: {n!r}" for n in needles if n in data]
    assert not hits, "\n".join(hits)


# --- parsing (no server) -------------------------------------------------------------------------


def test_query_parameters_become_an_identifier() -> None:
    from pacsvault.web import qido

    query = qido.parse([
        ("PatientName", "DUP*"), ("00080020", "20240101-20241231"),
        ("includefield", "00081030,Modality"), ("includefield", "all"),
        ("StudyInstanceUID", "1.2.3,1.2.4"), ("limit", "5000"), ("offset", "3"),
        ("RequestAttributesSequence.ScheduledProcedureStepID", "SPS1"),
        ("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "MR"), ("fuzzymatching", "false"),
    ], "STUDY")
    ds = query.identifier
    assert str(ds.PatientName) == "DUP*" and ds.StudyDate == "20240101-20241231"
    assert ds.StudyInstanceUID == ["1.2.3", "1.2.4"] and ds.ModalitiesInStudy == ["CT", "MR"]
    assert ds.RequestAttributesSequence[0].ScheduledProcedureStepID == "SPS1"
    assert "StudyDescription" in ds and "Modality" in ds and "PatientBirthDate" in ds
    assert query.include_all and query.limit == qido.MAX_RESULTS and query.offset == 3
    assert not query.warnings
    series = qido.parse([("StudyInstanceUID", "9.9")], "SERIES", study="1.2.3")
    assert series.identifier.StudyInstanceUID == "1.2.3"  # the path wins
    assert "PatientName" not in series.identifier  # study attributes only outside a study
    assert "PatientName" in qido.parse([], "IMAGE").identifier
    for bad in ([("Nope", "1")], [("7FE00010.00100010", "x")], [("00091001", "x")],
                [("limit", "-2")], [("Rows", "many")]):
        with pytest.raises(qido.QidoError):
            qido.parse(bad, "STUDY")


def test_accept_and_multipart_parsing() -> None:
    from pacsvault.web.multipart import MultipartError, parse_accept, parse_related

    ranges = parse_accept('multipart/related; type="application/dicom"; '
                          'transfer-syntax=1.2.840.10008.1.2.1; q=0.5, '
                          'multipart/related; type="application/octet-stream"; '
                          'transfer-syntax=*, image/png;q=0')
    assert [(r.part_type, r.transfer_syntax) for r in ranges] == [
        ("application/octet-stream", "*"), ("application/dicom", "1.2.840.10008.1.2.1")]
    assert parse_accept(None)[0].matches("image/jpeg")
    assert parse_accept("image/*")[0].matches("image/jp2")
    assert not parse_accept("image/*")[0].matches("application/dicom")
    body = (b"preamble\r\n--b\r\nContent-Type: application/dicom\r\n\r\none\r\n--b\r\n"
            b"\r\ntwo\r\n--b--\r\nepilogue")
    parts = parse_related(body, "b")
    assert [bytes(p.content) for p in parts] == [b"one", b"two"]
    assert parts[0].content_type == "application/dicom" and parts[1].headers == {}
    for broken in (body[:-16], b"--b\r\nContent-Type: x\r\n\r\nno end", b"nothing"):
        with pytest.raises(MultipartError):
            parse_related(broken, "b")
