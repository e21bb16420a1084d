"""Issue 13, "Tests that must exist": the conformance matrix and the Orthanc Big Endian round trip.

Matrix: one object per transfer syntax found in pydicom's shipped test files (Explicit and
Implicit VR LE, Explicit VR Big Endian, deflated, JPEG baseline/extended/lossless SV1,
JPEG-LS lossless/near-lossless, JPEG 2000 lossless/lossy, RLE) is stored by a pynetdicom
SCU with exactly that one syntax proposed, then each is retrieved four ways over DICOM
(C-GET by a requester taking only uncompressed syntaxes and by one taking everything;
C-MOVE into a dcmtk ``storescp`` with its defaults and into one with ``+xa``) and two over
WADO-RS (as stored, as Explicit VR LE). An object kept as stored must be byte-identical in
its dataset part; a converted one must carry pixel data equal to pydicom's own decoding of
the original and every other element equal; a lossy original never comes back claiming to
be lossless (LossyImageCompression "01").

Round trip: an Explicit VR Big Endian object is C-MOVEd from the vault into a real Orthanc
(Debian's, started here on loopback with HTTP authentication on), read back over Orthanc's
REST API and compared element by element; Orthanc then sends it back to the vault, which
must take it as a benign duplicate (the same instance re-encoded), not a conflict.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import shutil
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from bench.compare.orthanc import USER, OrthancTarget
from bench.compare.procs import DCMTK_ENV, Service
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    generate_uid,
)
from pynetdicom import AE as ClientAE
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
)

from pacsvault.dicomfile import render
from tests.harness.peers import StoreSCP, free_port, listening_by
from tests.helpers import AE, Server, VaultDir, events, make_vault, start_server
from tests.test_transcode_send import (
    ALL,
    DECODED,
    PLAIN,
    UNCOMPRESSED,
    WS,
    Stored,
    _check,
    _dataset_part,
    _move,
)

pytestmark = pytest.mark.slow

LOCAL = "127.0.0.1"
PHYSICIAN, PHYSICIAN_PW = "drmatrix", "copper-meadow-lantern-91-quiet-river"
ORTHANC_AE = "ORTHANC"
LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
AS_LE = f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'

# one shipped object per transfer syntax (offline names only)
SOURCES = (
    "CT_small.dcm",                    # Explicit VR Little Endian
    "MR_small_implicit.dcm",           # Implicit VR Little Endian
    "MR_small_bigendian.dcm",          # Explicit VR Big Endian
    "image_dfl.dcm",                   # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm",           # JPEG baseline
    "JPEG-lossy.dcm",                  # JPEG extended (12 bit)
    "SC_rgb_jpeg_gdcm.dcm",            # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",   # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",       # JPEG-LS near-lossless
    "MR_small_jp2klossless.dcm",       # JPEG 2000 lossless
    "JPEG2000.dcm",                    # JPEG 2000 (lossy)
    "MR_small_RLE.dcm",                # RLE lossless
)


@dataclass
class Env:
    root: Path
    vault: VaultDir
    server: Server
    stored: list[Stored]
    plain: StoreSCP
    everything: StoreSCP
    token: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.https_port}/dicom-web"


def _build(out: Path) -> list[tuple[Path, str, str, str, str]]:
    """Relabelled copies (fresh UIDs: several shipped files share one SOP Instance UID)."""
    out.mkdir(parents=True)
    built = []
    for i, name in enumerate(SOURCES):
        ds = dcmread(get_testdata_file(name))  # type: ignore[arg-type]
        ds.PatientName, ds.PatientID = f"Quetzal^Matrix{i:02d}", f"PVMATRIX{i:02d}X"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{i:02d}_{name}"
        ds.save_as(path, enforce_file_format=True)
        built.append((path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                      str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID)))
    return built


def _store_exactly(port: int, path: Path, sop_class: str, syntax: str) -> None:
    """pynetdicom SCU proposing only the object's own syntax; a path is sent undecoded."""
    ae = ClientAE(ae_title=WS)
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(LOCAL, port, ae_title=AE)
    assert assoc.is_established, path.name
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status and int(status.Status) == 0x0000, f"{path.name}: {status}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("matrix")
    render.register_plugins()  # the reference decoders (12-bit JPEG needs GDCM's plugin)
    vault = make_vault(root / "v")
    scps: list[StoreSCP] = []
    server: Server | None = None
    try:
        plain = StoreSCP.start(PLAIN, root, "+B")
        scps.append(plain)
        everything = StoreSCP.start(ALL, root, "+B", "+xa")
        scps.append(everything)
        v = vault.open()
        try:
            v.nodes.add(WS, LOCAL, roles=("store", "query", "retrieve"))
            v.nodes.add(PLAIN, LOCAL, plain.port, roles=("retrieve",))
            v.nodes.add(ALL, LOCAL, everything.port, roles=("retrieve",))
            # its port once an Orthanc holds one (the ``orthanc`` fixture)
            v.nodes.add(ORTHANC_AE, LOCAL, roles=("store", "retrieve"))
            v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
            token = v.accounts.create_token(PHYSICIAN, "1d").token
        finally:
            v.close()
        server = start_server(vault)
        stored: list[Stored] = []
        for path, sop_class, sop_uid, study_uid, syntax in _build(root / "corpus"):
            _store_exactly(server.port, path, sop_class, syntax)
            stored.append(Stored(path, sop_uid, study_uid, syntax))
        stored = _as_archived(vault, stored, root / "archived")
        yield Env(root, vault, server, stored, plain, everything, token)
    finally:
        if server is not None:
            server.stop()
        for scp in scps:
            scp.stop()


def _as_archived(vault: VaultDir, stored: list[Stored], out: Path) -> list[Stored]:
    out.mkdir()
    v = vault.open()
    try:
        result = []
        for n, s in enumerate(stored):
            (item,) = list(v.archive.locate(sop_uid=s.sop_uid))
            path = out / f"{n:02d}_{s.path.name}"
            path.write_bytes(v.archive.read(item))
            syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            assert syntax == s.syntax, f"{s.path.name} stored as {UID(syntax).name}"
            result.append(Stored(path, s.sop_uid, s.study_uid, syntax))
        return result
    finally:
        v.close()


def _lossy_kept(stored: Stored, received: Path) -> None:
    """A lossy original that left uncompressed still says it was lossy (PS3.3 C.7.6.1.1.5)."""
    if stored.syntax in LOSSY:
        back = dcmread(received, stop_before_pixels=True)
        if str(back.file_meta.TransferSyntaxUID) != stored.syntax:
            assert back.get("LossyImageCompression") == "01", \
                f"{stored.path.name}: lossy original left as {back.file_meta.TransferSyntaxUID}" \
                " without LossyImageCompression 01"


def _faithful(stored: Stored, received: Path) -> bool:
    """True when it came back converted (checked by test_transcode_send's ``_check``);
    kept as stored means byte-identical dataset part, trailing padding included (stored
    here by pynetdicom, which keeps it, unlike dcmtk's storescu)."""
    sent_as = dcmread(received, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if sent_as == stored.syntax:
        assert stored.syntax != ExplicitVRBigEndian, stored.path.name
        assert _dataset_part(received) == _dataset_part(stored.path), stored.path.name
        return False
    return _check(stored, received)


def _must_convert(s: Stored) -> bool:
    return UID(s.syntax).is_compressed or s.syntax == ExplicitVRBigEndian


# --- C-GET ------------------------------------------------------------------------------


def _get(env: Env, syntaxes: list[str], out: Path) -> tuple[Dataset, dict[str, Path]]:
    """C-GET of every study by a pynetdicom requester taking the given syntaxes (one
    context per (SOP class, syntax), so every stored syntax can be kept)."""
    out.mkdir()
    classes = sorted({str(dcmread(s.path, stop_before_pixels=True).SOPClassUID)
                      for s in env.stored})
    ae = ClientAE(ae_title=WS)
    ae.acse_timeout = ae.dimse_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in classes:
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, [syntax])
    roles: list[Any] = [build_role(c, scp_role=True) for c in classes]
    received: dict[str, Path] = {}

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        path = out / f"{len(received):02d}.dcm"
        path.write_bytes(event.encoded_dataset())
        received[uid] = path
        return 0x0000

    assoc = ae.associate(LOCAL, env.server.port, ae_title=AE, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = [s.study_uid for s in env.stored]
    try:
        responses = [s for s, _ in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet) if s]
    finally:
        assoc.release()
    return responses[-1], received


def test_get_uncompressed_only_requester(env: Env) -> None:
    final, got = _get(env, list(UNCOMPRESSED), env.root / "get-plain")
    assert final.Status == 0x0000, f"{final.Status:04X}"
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = {s.sop_uid for s in env.stored if _faithful(s, got[s.sop_uid])}
    assert {s.sop_uid for s in env.stored if _must_convert(s)} <= converted
    for s in env.stored:
        _lossy_kept(s, got[s.sop_uid])


def test_get_accept_everything_requester(env: Env) -> None:
    syntaxes = sorted({*UNCOMPRESSED, *(s.syntax for s in env.stored)})
    final, got = _get(env, syntaxes, env.root / "get-all")
    assert final.Status == 0x0000, f"{final.Status:04X}"
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = {s.sop_uid for s in env.stored if _faithful(s, got[s.sop_uid])}
    # only Big Endian leaves changed: it always leaves little endian
    assert converted == {s.sop_uid for s in env.stored if s.syntax == ExplicitVRBigEndian}


# --- C-MOVE -----------------------------------------------------------------------------


def test_move_into_storescp_defaults(env: Env) -> None:
    final, _ = _move(env, PLAIN)[-1]  # type: ignore[arg-type]
    assert final.Status == 0x0000, f"{final.Status:04X}"
    got = env.plain.files()
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = {s.sop_uid for s in env.stored if _faithful(s, got[s.sop_uid])}
    assert {s.sop_uid for s in env.stored if _must_convert(s)} <= converted
    for s in env.stored:
        _lossy_kept(s, got[s.sop_uid])


def test_move_into_storescp_accept_all(env: Env) -> None:
    final, _ = _move(env, ALL)[-1]  # type: ignore[arg-type]
    assert final.Status == 0x0000, f"{final.Status:04X}"
    got = env.everything.files()
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = {s.sop_uid for s in env.stored if _faithful(s, got[s.sop_uid])}
    assert converted == {s.sop_uid for s in env.stored if s.syntax == ExplicitVRBigEndian}


# --- WADO-RS ----------------------------------------------------------------------------


def _http(env: Env) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(env.vault.data / "tls" / "ca.crt"))
    return httpx.Client(verify=ctx, timeout=60, trust_env=False,
                        headers={"Authorization": f"Bearer {env.token}"})


def _parts(res: httpx.Response) -> list[bytes]:
    assert res.status_code == 200, (res.status_code, res.text[:200])
    boundary = re.search(r"boundary=\"?([^\";]+)", res.headers["content-type"])
    assert boundary is not None
    dash = b"--" + boundary.group(1).encode()
    body = res.content
    end = b"\r\n" + dash + b"--\r\n"
    assert body.startswith(dash) and body.endswith(end), "truncated multipart body"
    return [chunk.partition(b"\r\n\r\n")[2]
            for chunk in body[len(dash):-len(end)].split(b"\r\n" + dash)]


def _wado(env: Env, accept: str, out: Path) -> dict[str, Path]:
    out.mkdir()
    got: dict[str, Path] = {}
    with _http(env) as http:
        for n, s in enumerate(env.stored):
            ds = dcmread(s.path, stop_before_pixels=True)
            url = (f"{env.url}/studies/{s.study_uid}/series/{ds.SeriesInstanceUID}"
                   f"/instances/{s.sop_uid}")
            (part,) = _parts(http.get(url, headers={"Accept": accept}))
            path = out / f"{n:02d}.dcm"
            path.write_bytes(part)
            got[s.sop_uid] = path
    return got


def test_wado_as_stored(env: Env) -> None:
    got = _wado(env, AS_STORED, env.root / "wado-stored")
    for s in env.stored:
        back = dcmread(got[s.sop_uid], stop_before_pixels=True)
        assert back.file_meta.TransferSyntaxUID == s.syntax, s.path.name
        assert _dataset_part(got[s.sop_uid]) == _dataset_part(s.path), s.path.name


def test_wado_as_explicit_little_endian(env: Env) -> None:
    got = _wado(env, AS_LE, env.root / "wado-le")
    for s in env.stored:
        received = got[s.sop_uid]
        back = dcmread(received)
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, s.path.name
        if s.syntax == ExplicitVRLittleEndian:
            assert _dataset_part(received) == _dataset_part(s.path), s.path.name
            continue
        _elements_equal(back, dcmread(s.path), s.path.name)
        _lossy_kept(s, received)


# --- Big Endian round trip through Orthanc ----------------------------------------------


def _orthanc_config(env: Env, db: Path, password: str, dicom_port: int,
                    http_port: int) -> dict[str, object]:
    """bench/compare's Orthanc configuration (auth on, loopback HTTP, deny by default),
    with the vault as its only DICOM modality."""
    from bench.compare.orthanc import USER

    target = OrthancTarget.__new__(OrthancTarget)  # only its config(): no PKI, no process
    target.tls, target.db, target.password = False, db, password
    target.dicom_port, target.https_port = dicom_port, http_port
    cfg = target.config()
    cfg["Name"] = "matrix"
    cfg["Plugins"] = []  # DICOMweb is not needed here
    cfg.pop("DicomWeb", None)
    cfg["RegisteredUsers"] = {USER: password}
    cfg["DicomModalities"] = {"pacsvault": {
        "AET": AE, "Host": LOCAL, "Port": env.server.port, "AllowEcho": True,
        "AllowFind": False, "AllowGet": False, "AllowMove": False, "AllowStore": True}}
    return cfg


@dataclass
class Orthanc:
    http: httpx.Client  # authenticated
    http_port: int


def _start_orthanc(env: Env, root: Path, password: str) -> tuple[Service, int]:
    """Orthanc on two ports, its DICOM one registered as the vault's ORTHANC node.

    The ports are the OS's free ones of a moment ago: with the suite's parallel workers
    another process may take one first. So "started" means *this* Orthanc holds both
    (tests/harness/peers.py's ``listening_by``); one that lost the race exits, and the
    next attempt takes other ports (and moves the node)."""
    log = root / "orthanc.log"
    for attempt in range(5):
        dicom_port, http_port = free_port(), free_port()
        db = root / f"db{attempt}"
        db.mkdir(parents=True)
        conf = root / f"orthanc{attempt}.json"
        conf.touch(0o600)
        conf.write_text(json.dumps(_orthanc_config(env, db, password, dicom_port, http_port),
                                   indent=1))
        v = env.vault.open()
        try:
            v.nodes.update(ORTHANC_AE, port=dicom_port)
        finally:
            v.close()
        service = Service(["Orthanc", str(conf)], log, env=DCMTK_ENV)
        deadline = time.monotonic() + 60
        while not (listening_by(service.pid, http_port)
                   and listening_by(service.pid, dicom_port)):
            if service.proc.poll() is not None:
                break  # lost a port: try others
            if time.monotonic() > deadline:
                service.stop()
                raise AssertionError(f"Orthanc did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        else:
            return service, http_port
        service.stop()
    raise AssertionError(f"Orthanc found no free ports:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def orthanc(env: Env) -> Iterator[Orthanc]:
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc missing (scripts/install.sh --test installs Debian's orthanc)")
    root = env.root / "orthanc"
    root.mkdir()
    password = secrets.token_urlsafe(24)
    service, http_port = _start_orthanc(env, root, password)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}",
                          auth=(USER, password), timeout=60, trust_env=False) as http:
            yield Orthanc(http, http_port)
    finally:
        service.stop()


def _elements_equal(back: Dataset, original: Dataset, name: str) -> None:
    assert np.array_equal(back.pixel_array, original.pixel_array), name
    for elem in original:
        if elem.tag in DECODED:
            continue
        assert elem.tag in back, f"{name} {elem.tag} missing"
        assert back[elem.tag].value == elem.value, f"{name} {elem.tag}"


def test_big_endian_round_trip_through_orthanc(env: Env, orthanc: Orthanc) -> None:
    http = orthanc.http
    (big,) = [s for s in env.stored if s.syntax == ExplicitVRBigEndian]
    original = dcmread(big.path)
    assert http.get("/system").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{orthanc.http_port}/system",
                     trust_env=False).status_code == 401  # auth really on

    # vault -> Orthanc by C-MOVE (the vault must convert: Orthanc takes no Big Endian)
    final, _ = _move(_Only(env, big), ORTHANC_AE)[-1]  # type: ignore[arg-type]
    assert final.Status == 0x0000, f"{final.Status:04X}"
    found = http.post("/tools/lookup", content=big.sop_uid).json()
    (instance,) = [f["ID"] for f in found if f["Type"] == "Instance"]
    raw = http.get(f"/instances/{instance}/file")
    assert raw.status_code == 200
    from_orthanc = dcmread(io.BytesIO(raw.content))
    assert from_orthanc.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
    _elements_equal(from_orthanc, original, "via Orthanc")

    # Orthanc -> vault: the same instance re-encoded is a benign duplicate
    before = len(events(env.vault, "dicom.store.conflict"))
    res = http.post("/modalities/pacsvault/store", json={"Resources": [instance],
                                                          "Synchronous": True})
    assert res.status_code == 200, res.text
    answer = res.json()
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    assert answer.get("InstancesCount") == 1, answer
    deadline = time.monotonic() + 20
    duplicates: list[dict[str, object]] = []
    while time.monotonic() < deadline and not duplicates:
        duplicates = [e for e in events(env.vault, "dicom.store.duplicate")
                      if e["ae"] == ORTHANC_AE]
        time.sleep(0.3)
    assert duplicates, "the re-encoded copy was not recorded as a benign duplicate"
    assert len(events(env.vault, "dicom.store.conflict")) == before
    v = env.vault.open()
    try:
        (item,) = list(v.archive.locate(sop_uid=big.sop_uid))
        kept = dcmread(io.BytesIO(v.archive.read(item)))
    finally:
        v.close()
    _elements_equal(kept, original, "vault copy after the round trip")


@dataclass
class _Only:
    """Env narrowed to one stored object, for test_transcode_send's ``_move``."""

    env: Env
    one: Stored

    @property
    def server(self) -> Server:
        return self.env.server

    @property
    def stored(self) -> list[Stored]:
        return [self.one]
