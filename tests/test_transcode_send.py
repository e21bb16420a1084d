"""Issue 13, defects 1 and 2: C-MOVE/C-GET to receivers with default settings.

The foundation corpus (every encoding) plus an Explicit VR Big Endian object are stored
as sent, then retrieved by C-MOVE into a dcmtk ``storescp`` that accepts only uncompressed
syntaxes (its default), into one started with ``+xa`` (accept all), and by C-GET with
dcmtk ``getscu``'s defaults (uncompressed only). Every object must arrive; one that left
converted must carry pixel data equal to pydicom's own decoding of the original and the
same other elements; one kept as stored must be byte-identical in its dataset part. A
move to a registered node whose port is closed is A702 with the failed counter and the
Failed SOP Instance UID List, and a ``dicom.move`` record with the failed count.
"""

from __future__ import annotations

import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE as ClientAE
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsvault.dicomfile import render
from pacsvault.vault import Vault
from tests import corpus
from tests.harness.peers import StoreSCP
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    dcmtk,
    dcmtk_env,
    events,
    free_port,
    make_vault,
    start_server,
    storescu,
)

pytestmark = pytest.mark.slow

LOCAL = "127.0.0.1"
WS, PLAIN, ALL, GONE = "TCWS", "TCPLAIN", "TCALL", "TCGONE"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
TRAILING_PADDING = 0xFFFCFFFC
# attributes a decoding legitimately changes (pydicom's decompress: colour to RGB)
DECODED = {0x00280004, 0x00280006, 0x7FE00010, 0x7FE00001, 0x7FE00002, TRAILING_PADDING}


@dataclass(frozen=True)
class Stored:
    path: Path  # the object as the archive holds it (decrypted copy, for comparisons)
    sop_uid: str
    study_uid: str
    syntax: str


@dataclass
class Env:
    root: Path
    vault: VaultDir
    server: Server
    stored: list[Stored]
    plain: StoreSCP
    everything: StoreSCP


def _store_big_endian(port: int, out: Path) -> Stored:
    """Explicit VR Big Endian through pynetdicom with a Big Endian context (dcmtk's
    storescu would convert it)."""
    ds = dcmread(get_testdata_file("MR_small_bigendian.dcm"))  # type: ignore[arg-type]
    ds.PatientName, ds.PatientID = "Quetzal^Bigendian", "PVTESTBE01X"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = out / "bigendian.dcm"
    ds.save_as(path, enforce_file_format=True)
    ae = ClientAE(ae_title=WS)
    ae.add_requested_context(MRImageStorage, [ExplicitVRBigEndian])
    assoc = ae.associate(LOCAL, port, ae_title=AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dcmread(path))
    finally:
        assoc.release()
    assert status and int(status.Status) == 0x0000
    return Stored(path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), ExplicitVRBigEndian)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("transcode")
    # The reference decoding is pydicom's; 12-bit JPEG extended needs the GDCM plugin the
    # archive registers (pydicom's own GDCM plugin refuses 12-bit precision).
    render.register_plugins()
    vault = make_vault(root / "v")
    scps: list[StoreSCP] = []
    server: Server | None = None
    try:
        # +B: written exactly as received, so "as stored" can be checked byte for byte
        plain = StoreSCP.start(PLAIN, root, "+B")  # default: uncompressed only
        scps.append(plain)
        everything = StoreSCP.start(ALL, root, "+B", "+xa")
        scps.append(everything)
        v = Vault.open(vault.data, vault.key)
        try:
            v.nodes.add(WS, LOCAL, roles=("store", "query", "retrieve"))
            v.nodes.add(PLAIN, LOCAL, plain.port, roles=("retrieve",))
            v.nodes.add(ALL, LOCAL, everything.port, roles=("retrieve",))
            v.nodes.add(GONE, LOCAL, free_port(), roles=("retrieve",))  # nothing listens
        finally:
            v.close()
        server = start_server(vault)
        files = corpus.build(root / "corpus")
        stored: list[Stored] = []
        for f in files:
            res = storescu(server.port, [f.path], calling=WS, extra=f.proposal)
            assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"
            stored.append(Stored(f.path, f.sop_uid, f.study_uid, f.transfer_syntax))
        stored.append(_store_big_endian(server.port, root / "corpus"))
        stored = _as_archived(vault, stored, root / "archived")
        yield Env(root, vault, server, stored, plain, everything)
    finally:
        if server is not None:
            server.stop()
        for scp in scps:
            scp.stop()


def _as_archived(vault: VaultDir, stored: list[Stored], out: Path) -> list[Stored]:
    """The archive's own copies: the reference for "kept as stored" and for decoding."""
    out.mkdir()
    v = vault.open()
    try:
        result = []
        for n, s in enumerate(stored):
            (item,) = list(v.archive.locate(sop_uid=s.sop_uid))
            path = out / f"{n:02d}_{s.path.name}"
            path.write_bytes(v.archive.read(item))
            syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            assert syntax == s.syntax, s.path.name  # stored in the syntax it was sent in
            result.append(Stored(path, s.sop_uid, s.study_uid, syntax))
        return result
    finally:
        v.close()


# --- helpers ---------------------------------------------------------------------------


def _identifier(env: Env) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = [s.study_uid for s in env.stored]
    return ds


def _move(env: Env, destination: str) -> list[tuple[Dataset, Dataset | None]]:
    ae = ClientAE(ae_title=WS)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.acse_timeout = ae.dimse_timeout = 120
    assoc = ae.associate(LOCAL, env.server.port, ae_title=AE)
    assert assoc.is_established
    try:
        return [(status, ident) for status, ident in assoc.send_c_move(
            _identifier(env), destination, StudyRootQueryRetrieveInformationModelMove)
            if status]
    finally:
        assoc.release()


def _dataset_part(path: Path) -> bytes:
    """The bytes after the File Meta Information (what went over the wire), inflated for
    the deflated syntax (its compressed stream depends on the deflater's settings)."""
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    group_length = int(meta.FileMetaInformationGroupLength)
    body = raw[128 + 4 + 12 + group_length:]
    if meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        # the deflated stream is padded to even length; the inflated dataset is compared
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
    return body


def _check(stored: Stored, received: Path) -> bool:
    """Assert the received object is faithful; True when it came back converted."""
    back = dcmread(received)
    original = dcmread(stored.path)
    name = stored.path.name
    sent_as = str(back.file_meta.TransferSyntaxUID)
    if sent_as == stored.syntax:
        assert stored.syntax != ExplicitVRBigEndian, name
        if TRAILING_PADDING in original:  # storescu drops it on the way in (PS3.5 7.5)
            del original[TRAILING_PADDING]
            assert [e.tag for e in back] == [e.tag for e in original], name
            assert back.PixelData == original.PixelData, name
        else:
            assert _dataset_part(received) == _dataset_part(stored.path), name
        return False
    assert sent_as in UNCOMPRESSED, f"{name}: {sent_as}"
    assert np.array_equal(back.pixel_array, original.pixel_array), name
    assert back.pixel_array.dtype.byteorder in ("=", "<", "|"), name
    for elem in original:
        if elem.tag in DECODED:
            continue
        assert elem.tag in back, f"{name} {elem.tag} missing"
        assert back[elem.tag].value == elem.value, f"{name} {elem.tag}"
    return True


def _move_record(env: Env, destination: str, count: int = 1) -> list[dict[str, object]]:
    deadline = time.monotonic() + 20
    found: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        found = [e for e in events(env.vault, "dicom.move") if e["destination"] == destination]
        if len(found) >= count:
            break
        time.sleep(0.3)
    return found


# --- tests -----------------------------------------------------------------------------


def test_move_into_uncompressed_only_storescp_converts_what_it_must(env: Env) -> None:
    final, _ = _move(env, PLAIN)[-1]
    assert final.Status == 0x0000, f"{final.Status:04X}"
    assert final.NumberOfCompletedSuboperations == len(env.stored)
    got = env.plain.files()
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = [s for s in env.stored if _check(s, got[s.sop_uid])]
    must = {s.sop_uid for s in env.stored
            if UID(s.syntax).is_compressed or s.syntax == ExplicitVRBigEndian}
    assert must <= {s.sop_uid for s in converted}
    (record,) = _move_record(env, PLAIN)
    assert record["failed"] == 0 and record["sent"] == len(env.stored)
    assert record["converted"] == len(converted)
    assert "Explicit VR Little Endian" in str(record["converted_to"])
    assert record["outcome"] in ("success", 0, "SUCCESS") or str(record["outcome"]).endswith(
        "SUCCESS")


def test_move_into_accept_all_storescp_keeps_stored_syntaxes(env: Env) -> None:
    final, _ = _move(env, ALL)[-1]
    assert final.Status == 0x0000, f"{final.Status:04X}"
    got = env.everything.files()
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = {s.sop_uid for s in env.stored if _check(s, got[s.sop_uid])}
    big = {s.sop_uid for s in env.stored if s.syntax == ExplicitVRBigEndian}
    assert converted == big  # only Big Endian leaves changed: it always leaves little endian
    (record,) = _move_record(env, ALL)
    assert record["converted"] == 1 and record["failed"] == 0


def test_get_with_getscu_defaults_converts_what_it_must(env: Env) -> None:
    out = env.root / "get"
    out.mkdir()
    uid_list = "\\".join(s.study_uid for s in env.stored)
    res = subprocess.run(
        [dcmtk("getscu"), "-S", "+B", "-aet", WS, "-aec", AE, "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid_list}",
         LOCAL, str(env.server.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=180)
    assert res.returncode == 0, f"{res.stdout}{res.stderr}"
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
           for p in out.iterdir() if p.is_file()}
    assert set(got) == {s.sop_uid for s in env.stored}
    converted = [s for s in env.stored if _check(s, got[s.sop_uid])]
    must = {s.sop_uid for s in env.stored
            if UID(s.syntax).is_compressed or s.syntax == ExplicitVRBigEndian}
    assert must <= {s.sop_uid for s in converted}
    deadline = time.monotonic() + 20
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline and not records:
        records = [e for e in events(env.vault, "dicom.get") if e["requested"] == len(env.stored)]
        time.sleep(0.3)
    (record,) = records
    assert record["failed"] == 0 and record["sent"] == len(env.stored)
    assert record["converted"] == len(converted)


def test_move_to_registered_node_not_listening_is_not_a801(env: Env) -> None:
    final, identifier = _move(env, GONE)[-1]
    # registered, retrieve role, port: known. Not answering is "unable to perform
    # sub-operations" with every one failed (PS3.4 C.4.2.1.4), never A801.
    assert final.Status == 0xA702, f"{final.Status:04X}"
    assert final.NumberOfFailedSuboperations == len(env.stored)
    assert final.get("NumberOfCompletedSuboperations", 0) == 0
    assert identifier is not None
    listed = identifier.FailedSOPInstanceUIDList
    listed = [listed] if isinstance(listed, str) else list(listed)
    assert sorted(map(str, listed)) == sorted(s.sop_uid for s in env.stored)
    (record,) = _move_record(env, GONE)
    assert record["failed"] == len(env.stored) and record["sent"] == 0
    assert record["requested"] == len(env.stored) and record["converted"] == 0
    assert "could not be reached" in str(record["message"])
    assert str(record["outcome"]).lower().endswith("failure")


def test_get_when_requester_accepts_no_usable_syntax_fails_and_lists_it(env: Env) -> None:
    """A C-GET requester that takes CT only as JPEG 2000: nothing is re-encoded lossily
    (nor at all into a compressed syntax): the sub-operation fails, is counted and listed."""
    ct = next(s for s in env.stored if "CT_small" in s.path.name)
    ae = ClientAE(ae_title=WS)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [JPEG2000Lossless])
    role = build_role(CTImageStorage, scp_role=True)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return 0x0000

    assoc = ae.associate(LOCAL, env.server.port, ae_title=AE, ext_neg=[role],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ct.study_uid
    try:
        responses = [(s, i) for s, i in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet) if s]
    finally:
        assoc.release()
    final, ident = responses[-1]
    assert final.Status == 0xA702, f"{final.Status:04X}"
    assert final.NumberOfFailedSuboperations == 1 and not received
    assert ident is not None and str(ident.FailedSOPInstanceUIDList) == ct.sop_uid
    deadline = time.monotonic() + 20
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline and not records:
        records = [e for e in events(env.vault, "dicom.get")
                   if e["study_uids"] == [ct.study_uid]]
        time.sleep(0.3)
    (record,) = records
    assert record["failed"] == 1 and record["sent"] == 0 and record["converted"] == 0
    assert str(record["outcome"]).lower().endswith("failure")


# --- issue 17: retrieval without re-encoding --------------------------------------------


def _stored_body(path: Path) -> bytes:
    """The bytes after the File Meta Information, exactly (deflated streams included)."""
    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return raw[128 + 4 + 12 + int(meta.FileMetaInformationGroupLength):]


def _sent(env: Env, stored: Stored) -> Path:
    """The corpus file storescu sent for an archived object."""
    name = stored.path.name.split("_", 1)[1]
    return env.root / "corpus" / name


def test_get_pynetdicom_every_stored_syntax_is_byte_identical(env: Env) -> None:
    """A C-GET requester that accepts every stored (SOP class, syntax) gets each object's
    stored bytes exactly, deflated stream included (sent as stored, never re-encoded);
    Big Endian, never sent as stored, arrives as Explicit VR Little Endian."""
    ae = ClientAE(ae_title=WS)
    ae.acse_timeout = ae.dimse_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in sorted({str(dcmread(s.path, stop_before_pixels=True).SOPClassUID)
                             for s in env.stored}):
        syntaxes = {s.syntax for s in env.stored
                    if str(dcmread(s.path, stop_before_pixels=True).SOPClassUID) == sop_class}
        if ExplicitVRBigEndian in syntaxes:
            syntaxes = (syntaxes - {ExplicitVRBigEndian}) | {ExplicitVRLittleEndian}
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, [syntax])
        roles.append(build_role(sop_class, scp_role=True))
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        request = event.request
        received[str(request.AffectedSOPInstanceUID)] = (  # type: ignore[union-attr]
            str(event.context.transfer_syntax),
            bytes(request.DataSet.getvalue()))  # type: ignore[union-attr]
        return 0x0000

    assoc = ae.associate(LOCAL, env.server.port, ae_title=AE, ext_neg=list[Any](roles),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_get(
            _identifier(env), StudyRootQueryRetrieveInformationModelGet) if s]
    finally:
        assoc.release()
    assert responses[-1].Status == 0x0000, f"{responses[-1].Status:04X}"
    assert set(received) == {s.sop_uid for s in env.stored}
    for s in env.stored:
        syntax, body = received[s.sop_uid]
        if s.syntax == ExplicitVRBigEndian:
            assert syntax == ExplicitVRLittleEndian
            continue
        assert syntax == s.syntax, s.path.name
        # exactly what the archive holds, i.e. what storescu put on the wire (it rewrites
        # some files as it sends them: trailing padding dropped, JPEG-lossy's header)
        assert body == _stored_body(s.path), s.path.name


def test_get_getscu_each_syntax_preferred_is_byte_identical(env: Env) -> None:
    """dcmtk ``getscu`` preferring each corpus syntax in turn (one ``+x?`` family per run):
    the object comes back in its stored syntax with the stored bytes."""
    flags = {"-xd": "+xd", "-xy": "+xy", "-xx": "+xx", "-xs": "+xs", "-xt": "+xt",
             "-xu": "+xu", "-xv": "+xv", "-xw": "+xw", "-xr": "+xr"}
    checked = 0
    for target in env.stored:
        if target.syntax in (ExplicitVRBigEndian, ImplicitVRLittleEndian):
            continue  # Big Endian is never sent as is; for Implicit VR the context is the
            # acceptor's choice (ours prefers explicit): the pynetdicom test covers it
        proposal = corpus.SOURCES.get(_sent(env, target).name.split("_", 1)[1], ())
        prefer = flags[proposal[0]] if proposal else "+xe"
        out = env.root / f"getscu-{checked:02d}"
        out.mkdir()
        res = subprocess.run(
            [dcmtk("getscu"), "-S", "+B", prefer, "-aet", WS, "-aec", AE, "-od", str(out),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={target.study_uid}",
             LOCAL, str(env.server.port)],
            capture_output=True, text=True, env=dcmtk_env(), timeout=120)
        assert res.returncode == 0, f"{res.stdout}{res.stderr}"
        (got,) = [p for p in out.iterdir() if p.is_file()]
        back = dcmread(got, stop_before_pixels=True)
        assert str(back.SOPInstanceUID) == target.sop_uid
        assert str(back.file_meta.TransferSyntaxUID) == target.syntax, target.path.name
        assert _stored_body(got) == _stored_body(target.path), target.path.name
        checked += 1
    assert checked == len(env.stored) - 2


def test_move_movescu_into_accept_all_storescp_is_byte_identical(env: Env) -> None:
    """dcmtk ``movescu`` asks for every study to go to ``storescp +xa +B``: each object
    arrives in its stored syntax with the stored bytes exactly (the deflated stream too,
    which a re-encoding would change); Big Endian arrives as Explicit VR Little Endian."""
    for old in env.everything.out.iterdir():
        if old.is_file():
            old.unlink()
    uid_list = "\\".join(s.study_uid for s in env.stored)
    res = subprocess.run(
        [dcmtk("movescu"), "-S", "-aet", WS, "-aec", AE, "-aem", ALL,
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid_list}",
         LOCAL, str(env.server.port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=180)
    assert res.returncode == 0, f"{res.stdout}{res.stderr}"
    got = env.everything.files()
    assert set(got) == {s.sop_uid for s in env.stored}
    for s in env.stored:
        syntax = str(dcmread(got[s.sop_uid], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if s.syntax == ExplicitVRBigEndian:
            assert syntax == ExplicitVRLittleEndian
            continue
        assert syntax == s.syntax, s.path.name
        assert _stored_body(got[s.sop_uid]) == _stored_body(s.path), s.path.name


def test_get_sends_the_stored_bytes_not_a_re_encoding(env: Env, tmp_path: Path) -> None:
    """A SOP Instance UID padded with a space (seen from real devices) instead of NUL:
    pydicom reads it and, once the value is used (pynetdicom reads it to send), would write
    it back NUL-padded, so only the stored bytes themselves come back identical. Stored
    raw (pynetdicom sends the file's bytes), fetched by C-GET."""
    from pynetdicom import _config as pynetdicom_config

    ds = dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds.PatientName, ds.PatientID = "Quetzal^Spacepadded", "PVTESTSP01X"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    uid = generate_uid()
    while len(uid) % 2 == 0:  # odd: the stored value carries one byte of padding
        uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = tmp_path / "space.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    meta_end = len(raw) - len(_stored_body(path))
    body = raw[meta_end:]
    nul_padded = b"\x08\x00\x18\x00UI" + (len(uid) + 1).to_bytes(2, "little") + uid.encode() + b"\0"
    assert body.count(nul_padded) == 1
    path.write_bytes(raw[:meta_end] + body.replace(nul_padded, nul_padded[:-1] + b" "))
    ae = ClientAE(ae_title=WS)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    saved = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, as they are
    assoc = ae.associate(LOCAL, env.server.port, ae_title=AE)
    try:
        assert assoc.is_established
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = saved
    assert status and int(status.Status) == 0x0000
    sent = _stored_body(path)
    assert nul_padded[:-1] + b" " in sent

    getter = ClientAE(ae_title=WS)
    getter.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    getter.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(bytes(event.request.DataSet.getvalue()))  # type: ignore[union-attr]
        return 0x0000

    assoc = getter.associate(LOCAL, env.server.port, ae_title=AE,
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    try:
        final = [s for s, _ in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet) if s][-1]
    finally:
        assoc.release()
    assert final.Status == 0x0000, f"{final.Status:04X}"
    assert received == [sent]
