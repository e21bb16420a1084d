"""Bad objects, a nearly full disk and re-sent instances: a failure status (PS3.4 B.2.3), the
server keeps serving, nothing half-stored, and duplicates follow the documented policy.

Broken byte streams are sent with pynetdicom's SCU API from a file *path* with
``STORE_SEND_CHUNKED_DATASET`` on: pynetdicom then reads only the file meta (for the SOP
class, instance and transfer syntax of the request) and sends the bytes after group 0002
as they are, without decoding them (``Association.send_c_store`` + ``dsutils.split_dataset``).
Without that switch it would ``dcmread`` the file and re-encode it, repairing or refusing the
damage before it reaches the server.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from pacsvault.vault import Vault
from tests.helpers import AE as SERVER_AE
from tests.helpers import Server, VaultDir, events, make_vault, start_server, storescu

# every test here starts a server (or shares one): out of the quick loops
pytestmark = pytest.mark.slow

CALLING = "MODALITY"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
WARNING_DISCARDED = 0xB006
PATIENT_NAME_TAG = b"\x10\x00\x10\x00PN"  # (0010,0010) PN, explicit VR little endian
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00OW"  # (7FE0,0010) OW


# --- sending ------------------------------------------------------------------------


@contextmanager
def _raw_sending() -> Iterator[None]:
    """Make ``send_c_store(path)`` send the dataset bytes after the file meta verbatim."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


@contextmanager
def _association(port: int, *paths: Path) -> Iterator[Association]:
    ae = AE(ae_title=CALLING)
    for path in paths:
        meta, _ = split_dataset(path)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=SERVER_AE)
    assert assoc.is_established, "association refused or failed"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _store(assoc: Association, path: Path) -> int:
    with _raw_sending():
        rsp = assoc.send_c_store(path)
    assert "Status" in rsp, f"no C-STORE response for {path.name} (association dropped?)"
    return int(rsp.Status)


def _send(port: int, path: Path) -> int:
    """One C-STORE of ``path`` in its own association; returns the response status."""
    with _association(port, path) as assoc:
        return _store(assoc, path)


# --- inspecting the vault ------------------------------------------------------------


def _status(vault: VaultDir) -> dict[str, object]:
    return json.loads(vault.cli("status", "--json").stdout)  # type: ignore[no-any-return]


def _instances(vault: VaultDir) -> int:
    counts = _status(vault)["counts"]
    assert isinstance(counts, dict)
    return int(counts["instances"])


def _counts(vault: VaultDir) -> dict[str, int]:
    """The index counts read in-process (much quicker than a CLI run per check)."""
    v = Vault.open(vault.data, vault.key)
    try:
        return v.archive.counts()
    finally:
        v.close()


def _stored_bytes(vault: VaultDir, sop_uid: str) -> bytes:
    """An instance decrypted in-process, as ``export`` would write it."""
    v = Vault.open(vault.data, vault.key)
    try:
        (item,) = v.archive.locate(sop_uid=sop_uid)
        return v.archive.read(item)
    finally:
        v.close()


def _object_files(vault: VaultDir) -> list[Path]:
    return sorted((vault.data / "objects").rglob("*.pvo"))


def _leftovers(vault: VaultDir) -> list[Path]:
    tmp = vault.data / "objects" / ".tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def _dataset_bytes(raw: bytes) -> bytes:
    """Everything after the preamble and file meta group (0002)."""
    assert raw[128:132] == b"DICM"
    # (0002,0000) UL, 4-byte value: the group length follows its 12-byte element
    (group_len,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_len :]


# --- the corpus ----------------------------------------------------------------------

TRAILING_PADDING = 0xFFFCFFFC


def _relabelled(out: Path, name: str, *, keep_padding: bool = False, **changes: str) -> Path:
    """CT_small with fresh UIDs (and the ``changes`` given), written as a Part 10 file.

    CT_small ends with Data Set Trailing Padding, which dcmtk drops when it sends a file;
    it is removed unless asked for, so that every sender transmits the same bytes.
    """
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    ds = dcmread(source)
    if not keep_padding:
        del ds[TRAILING_PADDING]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = out / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _part10(meta: FileMetaDataset, dataset: bytes) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + dataset


def _corrupt(intact: Path, kind: str) -> bytes:
    """An explicit VR little endian file broken in one way; its file meta stays valid."""
    raw = intact.read_bytes()
    _, meta_end = split_dataset(intact)
    name = raw.index(PATIENT_NAME_TAG, meta_end)
    pixel = raw.index(PIXEL_DATA_TAG, meta_end)
    data = bytearray(raw)
    if kind == "truncated-in-pixel-data":
        return raw[: pixel + 12 + 1000]
    if kind == "truncated-in-header":
        return raw[: name + 8 + 5]  # in the middle of PatientName's value
    if kind == "garbage-after-meta":
        return raw[:meta_end] + random.Random(20240312).randbytes(4096)
    if kind == "patient-name-length-too-long":
        data[name + 6 : name + 8] = struct.pack("<H", 0x4000)
        return bytes(data)
    if kind == "patient-name-length-off-by-some":
        # a modest overrun: the parser resumes inside the next element's header
        (actual,) = struct.unpack("<H", raw[name + 6 : name + 8])
        data[name + 6 : name + 8] = struct.pack("<H", actual + 6)
        return bytes(data)
    if kind == "pixel-data-length-too-long":
        # OW: 2 reserved bytes, then a 4-byte length
        data[pixel + 8 : pixel + 12] = struct.pack("<I", len(raw))
        return bytes(data)
    raise AssertionError(kind)


BROKEN = [
    "truncated-in-pixel-data",
    "truncated-in-header",
    "garbage-after-meta",
    "patient-name-length-too-long",
    "patient-name-length-off-by-some",
    "pixel-data-length-too-long",
]


def _is_bad_data_failure(status: int) -> bool:
    """PS3.4 B.2.3: A9xx (data set does not match SOP class) or Cxxx (cannot understand)."""
    return (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


# --- bad data (one vault and server for the module; assertions on differences) --------


@dataclass
class Shared:
    vault: VaultDir
    server: Server
    root: Path

    good_sent: set[str] = field(default_factory=set)

    def instances(self) -> int:
        return _counts(self.vault)["instances"]

    def sent_ok(self, *paths: Path) -> None:
        self.good_sent.update(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                              for p in paths)

    def failures(self) -> list[dict[str, object]]:
        return events(self.vault, "dicom.store.failed")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("robustness")
    vault = make_vault(root / "v")
    vault.add_node(CALLING)
    server = start_server(vault)
    yield Shared(vault, server, root)
    assert server.stop() == 0, "the server did not shut down cleanly after the bad objects"


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_object_fails_and_server_keeps_serving(
    shared: Shared, tmp_path: Path, kind: str
) -> None:
    server, vault = shared.server, shared.vault
    intact = _relabelled(tmp_path, "intact.dcm", keep_padding=True)
    bad = tmp_path / f"{kind}.dcm"
    bad.write_bytes(_corrupt(intact, kind))  # same SOP Instance UID as the intact file
    other = _relabelled(tmp_path, "other.dcm")
    instances, failures = shared.instances(), len(shared.failures())

    # the broken object, then the intact one, in the same association
    with _association(server.port, bad) as assoc:
        status = _store(assoc, bad)
        assert _is_bad_data_failure(status), f"{kind}: status {status:04X}"
        assert status == CANNOT_UNDERSTAND, f"{kind}: status {status:04X}"
        assert server.alive()
        assert _store(assoc, intact) == SUCCESS
    # and another good object in a fresh association right after
    assert server.alive()
    assert _send(server.port, other) == SUCCESS

    assert shared.instances() == instances + 2
    assert len(_object_files(vault)) == instances + 2
    assert not _leftovers(vault)
    failed = shared.failures()[failures:]
    assert len(failed) == 1
    assert failed[0]["ae"] == CALLING and failed[0]["outcome"] == "serious_failure"
    assert f"status {status:04X}" in str(failed[0]["message"])
    shared.sent_ok(intact, other)
    # the failure left nothing behind under its UID: the intact object is the one kept
    back = _stored_bytes(vault, str(dcmread(intact).SOPInstanceUID))
    assert _dataset_bytes(back) == _dataset_bytes(intact.read_bytes())


def test_every_broken_object_in_one_association(shared: Shared, tmp_path: Path) -> None:
    """A modality that sends a whole batch of bad objects does not wear the server down."""
    server = shared.server
    paths = []
    for kind in BROKEN:
        paths.append(tmp_path / f"{kind}.dcm")
        paths[-1].write_bytes(_corrupt(_relabelled(tmp_path, f"src-{kind}.dcm"), kind))
    good = [_relabelled(tmp_path, f"good{i}.dcm") for i in range(3)]
    instances, failures = shared.instances(), len(shared.failures())
    with _association(server.port, *paths) as assoc:
        statuses = {p.stem: _store(assoc, p) for p in paths}
        assert _store(assoc, good[0]) == SUCCESS
    assert all(_is_bad_data_failure(s) for s in statuses.values()), statuses
    assert server.alive()
    for path in good[1:]:
        assert _send(server.port, path) == SUCCESS
    shared.sent_ok(*good)
    assert shared.instances() == instances + len(good)
    assert len(shared.failures()) == failures + len(BROKEN)
    assert not _leftovers(shared.vault)


def _missing_study_uid(out: Path) -> bytes:
    path = _relabelled(out, "no-study-uid.dcm")
    ds = dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _invalid_study_uid(out: Path) -> bytes:
    return _relabelled(out, "bad-study-uid.dcm", StudyInstanceUID="1.2.3.abc").read_bytes()


def _uid_differs_from_request(out: Path) -> bytes:
    """The C-STORE request (built from the file meta) names another SOP Instance UID."""
    path = _relabelled(out, "uid-mismatch.dcm")
    meta = dcmread(path).file_meta
    meta.MediaStorageSOPInstanceUID = generate_uid()  # pydicom's save_as would undo this
    return _part10(meta, _dataset_bytes(path.read_bytes()))


def _class_differs_from_request(out: Path) -> bytes:
    """A CT dataset announced as an MR image."""
    path = _relabelled(out, "class-mismatch.dcm")
    meta = dcmread(path).file_meta
    meta.MediaStorageSOPClassUID = MRImageStorage
    return _part10(meta, _dataset_bytes(path.read_bytes()))


@pytest.mark.parametrize(
    "build",
    [_missing_study_uid, _invalid_study_uid, _uid_differs_from_request,
     _class_differs_from_request],
    ids=["missing-study-uid", "invalid-study-uid", "sop-uid-differs-from-request",
         "sop-class-differs-from-request"],
)
def test_parsable_but_unfileable_object_gets_a900(
    shared: Shared, tmp_path: Path, build: Callable[[Path], bytes]
) -> None:
    server = shared.server
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(build(tmp_path))
    instances, failures = shared.instances(), len(shared.failures())
    assert _send(server.port, bad) == DOES_NOT_MATCH
    assert server.alive()
    good = _relabelled(tmp_path, "good.dcm")
    assert _send(server.port, good) == SUCCESS
    shared.sent_ok(good)
    assert shared.instances() == instances + 1
    failed = shared.failures()[failures:]
    assert len(failed) == 1 and "status A900" in str(failed[0]["message"])


def test_status_and_export_show_only_the_good_objects(shared: Shared, tmp_path: Path) -> None:
    """After every bad object above: the CLI sees exactly the good ones, all readable."""
    assert shared.server.alive()
    status = _status(shared.vault)
    assert status["counts"]["instances"] == len(shared.good_sent)  # type: ignore[index]
    out = tmp_path / "export"
    shared.vault.cli("export", "--all", "--out", out)
    assert {p.stem for p in out.rglob("*.dcm")} == shared.good_sent
    assert not _leftovers(shared.vault)


# --- disk nearly full ----------------------------------------------------------------


def test_disk_nearly_full_answers_out_of_resources(vault: VaultDir, tmp_path: Path) -> None:
    vault.add_node(CALLING)
    vault.set_toml("storage", "min_free_mb", "100000000")  # 100 TB reserve: always "full"
    path = _relabelled(tmp_path, "ct.dcm")
    server = start_server(vault)
    try:
        res = storescu(server.port, [path], calling=CALLING, extra=("-v",))
        assert res.returncode != 0, res.stderr
        assert "Received Store Response (Refused: OutOfResources)" in res.stderr, res.stderr
        assert _send(server.port, path) == OUT_OF_RESOURCES
        assert server.alive()
        assert _instances(vault) == 0
        assert not _object_files(vault) and not _leftovers(vault)
        failed = events(vault, "dicom.store.failed")
        assert len(failed) == 2 and all("A700" in str(e["message"]) for e in failed)
    finally:
        assert server.stop() == 0
    # space freed (here: the reserve lowered) and a restart: the same object now stores
    vault.set_toml("storage", "min_free_mb", "0")
    server = start_server(vault, log_name="serve2.log")
    try:
        assert storescu(server.port, [path], calling=CALLING).returncode == 0
        assert _instances(vault) == 1
    finally:
        server.stop()


# --- duplicates ----------------------------------------------------------------------


def test_identical_resend_is_success_without_duplicate(
    server: Server, vault: VaultDir, tmp_path: Path
) -> None:
    path = _relabelled(tmp_path, "ct.dcm")
    assert _send(server.port, path) == SUCCESS
    assert _send(server.port, path) == SUCCESS
    # the same instance from another implementation: dcmtk sends these very bytes (the
    # file has no trailing padding for it to drop, see _relabelled)
    res = storescu(server.port, [path], calling=CALLING)
    assert res.returncode == 0, res.stderr
    with _association(server.port, path) as assoc:
        assert [_store(assoc, path) for _ in range(3)] == [SUCCESS] * 3
    assert _instances(vault) == 1
    assert len(_object_files(vault)) == 1
    assert not events(vault, "dicom.store.conflict")
    assert not events(vault, "dicom.store.failed")


def test_different_object_under_same_uid_keeps_first(
    server: Server, vault: VaultDir, tmp_path: Path
) -> None:
    first = _relabelled(tmp_path, "first.dcm", SeriesDescription="FIRST SERIES")
    ds = dcmread(first)
    ds.SeriesDescription = "SECOND SERIES"
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    sop = str(ds.SOPInstanceUID)

    assert _send(server.port, first) == SUCCESS
    assert _send(server.port, second) == WARNING_DISCARDED
    res = storescu(server.port, [second], calling=CALLING, extra=("-v",))
    assert "Warning" in res.stderr, res.stderr
    assert server.alive()
    # the first one is re-sent fine afterwards (still byte-identical to what is kept)
    assert _send(server.port, first) == SUCCESS

    assert _instances(vault) == 1
    assert len(_object_files(vault)) == 1
    out = tmp_path / "export"
    vault.cli("export", "--all", "--out", out)
    exported = list(out.rglob("*.dcm"))
    assert [p.stem for p in exported] == [sop]
    assert _dataset_bytes(exported[0].read_bytes()) == _dataset_bytes(first.read_bytes())
    assert dcmread(exported[0]).SeriesDescription == "FIRST SERIES"

    conflicts = events(vault, "dicom.store.conflict")
    assert len(conflicts) == 2  # pynetdicom's and dcmtk's attempt
    for event in conflicts:
        assert event["ae"] == CALLING
        assert event["sop_uids"] == [sop]
        assert event["study_uids"] == [str(ds.StudyInstanceUID)]
    assert not events(vault, "dicom.store.failed")
