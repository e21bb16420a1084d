"""Issue 17, C-FIND responses written directly (``dicom/findwire``) and the association
negotiation made cheaper (``dicom/uidcheck``, ``restrict_contexts`` on the requested
contexts only, the server's contexts shared): what leaves is what left before.

- the C-FIND-RSP command set, byte for byte pynetdicom's, for every kind of response the
  path takes; the ones it does not take are named; the PDUs of a message are pynetdicom's;
- one served vault (in-process ``DicomService``, 25 studies, one answer larger than a
  4096-byte PDU), the path on and off: pynetdicom as SCU at max PDU 4096, 16385 and
  unlimited receives the same PDUs byte for byte (several matches, a first chunk of 20
  and a second one, an answer over several PDUs); dcmtk ``findscu`` at 4096 and 16385
  writes the same answer files; a C-CANCEL sent on the first answer (pynetdicom, and
  ``findscu --cancel 1``) ends the C-FIND with Cancel and the association answers the
  next C-FIND in full; ``gdcmscu`` sees every answer (a result check: it crashes at
  release here, see the interop notes);
- the contexts accepted and refused for dcmtk ``getscu``, ``storescu`` and ``findscu``
  proposals and a pynetdicom proposal with a refused role are what pynetdicom's own
  ``negotiate_as_acceptor`` gives over the server's full list (with the same syntax
  order), and the registered UIDs that skip pynetdicom's checks give what the checks give.
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE as ClientAE
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, evt, utils
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from pacsvault.dicom import findwire, qr, sendpath, uidcheck
from tests.helpers import AE, dcmtk, dcmtk_env, wait_until

LOCAL = "127.0.0.1"
CALLING, QUERY_ONLY = "FINDFAST", "FINDONLY"
STUDIES = 25  # more than qr.FIND_FIRST_CHUNK: two chunks
PDU_SIZES = (4096, 16385, 0)
FIND = StudyRootQueryRetrieveInformationModelFind


# --- the encoding, in-process -----------------------------------------------------------


def _pynetdicom_command(primitive: C_FIND) -> bytes:
    msg = C_FIND_RSP()
    msg.primitive_to_message(primitive)
    out = encode(msg.command_set, True, True)
    assert out is not None
    return out


def _rsp(status: int, msg_id: int = 1, sop_class: str | None = str(FIND),
         identifier: bytes | None = None) -> C_FIND:
    rsp = C_FIND()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = status
    rsp.Identifier = BytesIO(identifier) if identifier is not None else None
    return rsp


@pytest.mark.parametrize(("status", "msg_id", "sop_class", "identifier"), [
    (0xFF00, 1, str(FIND), b"\x08\x00\x52\x00\x06\x00STUDY "),
    (0xFF01, 65535, "1.2.840.10008.5.1.4.1.2.1.1", b"\x10\x00\x10\x00\x02\x00A "),
    (0x0000, 7, str(FIND), None), (0xFE00, 8, str(FIND), None),
    (0xA700, 9, str(FIND), None), (0xC311, 10, None, None), (0xB000, 0, "1.2.3", None)])
def test_command_set_is_pynetdicom_encoding(status: int, msg_id: int, sop_class: str | None,
                                            identifier: bytes | None) -> None:
    rsp = _rsp(status, msg_id, sop_class, identifier)
    assert findwire.encode_find_rsp(rsp) == _pynetdicom_command(rsp)


def test_responses_left_to_pynetdicom() -> None:
    """A comment, an offending element, a request, an unusual UID: pynetdicom's path."""
    with_comment = _rsp(0xC000)
    with_comment.ErrorComment = "no"  # type: ignore[assignment]
    offending = _rsp(0xA900)
    offending.OffendingElement = [0x00100010]  # type: ignore[assignment]
    request = C_FIND()
    request.MessageID = 1
    odd_uid = _rsp(0xFF00, sop_class="1.2.03", identifier=b"\0\0\0\0")
    for primitive in (with_comment, offending, request, odd_uid):
        assert findwire.encode_find_rsp(primitive) is None


def _pynetdicom_pdus(rsp: C_FIND, context_id: int, max_pdu: int) -> bytes:
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    return b"".join(P_DATA_TF(pdata).encode() for pdata in msg.encode_msg(context_id, max_pdu))


@pytest.mark.parametrize("max_pdu", PDU_SIZES)
@pytest.mark.parametrize("size", [0, 10, 4090, 4091, 9000])
def test_pdus_are_pynetdicom_pdus(max_pdu: int, size: int) -> None:
    rsp = _rsp(0xFF00 if size else 0x0000, 3,
               identifier=bytes(range(256)) * (size // 256) + b"\x01" * (size % 256)
               if size else None)
    command = findwire.encode_find_rsp(rsp)
    assert command is not None
    data = rsp.Identifier.getvalue() if rsp.Identifier is not None else b""
    cut = sendpath.fragments(3, command, data, max_pdu)
    assert cut is not None
    again = _rsp(0xFF00 if size else 0x0000, 3, identifier=data or None)
    assert b"".join(cut[0]) == _pynetdicom_pdus(again, 3, max_pdu)


def test_send_msg_hooks_installed_once_find_first() -> None:
    from pynetdicom.dimse import DIMSEServiceProvider

    from pacsvault.dicom import patches, retrieve

    retrieve.install()
    findwire.install()
    findwire.install()
    patches.wrap_send_msg(sendpath.send_msg)
    hooks = DIMSEServiceProvider.send_msg.pv_hooks  # type: ignore[attr-defined]
    assert hooks == [findwire.send_msg, sendpath.send_msg]


# --- registered UIDs: the checks skipped give what the checks give --------------------------


def _upstream() -> tuple[Any, Any]:
    import pynetdicom.utils
    from pynetdicom.presentation import PresentationContext as Cx

    set_uid = getattr(pynetdicom.utils.set_uid, "__wrapped__", pynetdicom.utils.set_uid)
    add = getattr(Cx.add_transfer_syntax, "__wrapped__", Cx.add_transfer_syntax)
    return set_uid, add


def test_registered_uids_give_what_the_checks_give(caplog: pytest.LogCaptureFixture) -> None:
    import pacsvault.dicom.server  # noqa: F401 - installs uidcheck

    upstream_set, upstream_add = _upstream()
    assert utils.set_uid is not upstream_set  # installed
    values: list[Any] = []
    for text in [*UID_dictionary, str(PYNETDICOM_IMPLEMENTATION_UID)]:
        values += [text, text.encode("ascii"), UID(text)]
    # not registered: checked by pynetdicom as before (private, padded, malformed, long)
    values += ["1.2.3.4", b"1.2.3.4", " 1.2.840.10008.1.2", "1.2.840.10008.1.2 ",
               "1.02.3", "1." + "2" * 70, "abc", "", b"", None]
    for value in values:
        for args in ((True, True, True), (False, False, True), (True, True, False)):
            outcome: list[Any] = []
            for fn in (utils.set_uid, upstream_set):
                caplog.clear()
                with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
                    try:
                        got: Any = fn(value, "x", *args)
                        outcome.append((type(got), got))
                    except (ValueError, TypeError) as exc:
                        outcome.append((type(exc), str(exc)))
                outcome.append([(r.levelname, r.getMessage()) for r in caplog.records])
            assert outcome[:2] == outcome[2:], value
        if value is None:
            continue
        contexts = []
        for add in (PresentationContext.add_transfer_syntax, upstream_add):
            cx = PresentationContext()
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
                try:
                    add(cx, value)
                    add(cx, value)  # a second time: not listed twice
                    result: Any = [(type(t), t) for t in cx.transfer_syntax]
                except ValueError as exc:
                    result = str(exc)
            contexts.append((result, [(r.levelname, r.getMessage()) for r in caplog.records]))
        assert contexts[0] == contexts[1], value
    assert uidcheck.known("1.2.840.10008.1.2.1") and not uidcheck.known("1.2.3.4")
    assert uidcheck.known(str(PYNETDICOM_IMPLEMENTATION_UID))


# --- one served vault ---------------------------------------------------------------------


@dataclass
class Env:
    root: Path
    service: Any
    vault: Any
    port: int
    accepted: list[dict[str, Any]]
    big_study: str
    contexts: list[tuple[Any, ...]]  # the server's own, as started

    def wires(self) -> int:
        return WRITES[0]


WRITES = [0]  # ``sendpath.Wire`` writes by the DUL threads (counted while ``env`` serves)


def _study(i: int, comments: str = "") -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = f"FINDFAST^P{i:02d}", f"FF-{i:02d}"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = f"202401{i % 28 + 1:02d}", "101010", f"A{i}"
    ds.StudyDescription, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "WIRE", "OT", 1, 1
    if comments:
        ds.PatientComments = comments
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from pydicom import dcmread

    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    root = tmp_path_factory.mktemp("findfast")
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(CALLING, LOCAL, roles=("store", "query", "retrieve"))
    vault.nodes.add(QUERY_ONLY, LOCAL, roles=("query",))
    big = ""
    for i in range(STUDIES):
        raw = _study(i, "COMMENT " * 800 if i == 3 else "")
        vault.archive.store(raw, source_ae=CALLING)
        if i == 3:
            big = str(dcmread(BytesIO(raw)).StudyInstanceUID)
    vault.archive.settle()
    service = DicomService(vault)
    accepted: list[dict[str, Any]] = []
    original = service._on_accepted

    def on_accepted(event: evt.Event) -> None:
        accepted.append(_negotiated(event.assoc))
        original(event)

    service._on_accepted = on_accepted  # type: ignore[method-assign]
    written = sendpath.WireDUL._pv_write

    def counted(self: Any, wire: sendpath.Wire) -> None:
        WRITES[0] += 1
        written(self, wire)

    sendpath.WireDUL._pv_write = counted  # type: ignore[method-assign]
    port = service.start(LOCAL, 0, None)["dicom_port"]
    assert gc.get_freeze_count() > 0  # the start-up heap out of pynetdicom's full collections
    try:
        yield Env(root, service, vault, port, accepted, big, _server_contexts(service))
    finally:
        service.stop()
        vault.close()
        sendpath.WireDUL._pv_write = written  # type: ignore[method-assign]


def _server_contexts(service: Any) -> list[tuple[Any, ...]]:
    return [(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax], cx.scu_role,
             cx.scp_role, cx.context_id) for cx in service.ae.supported_contexts]


def _identifier(**extra: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "FINDFAST^*"
    for keyword in ("StudyInstanceUID", "PatientID", "StudyDate", "AccessionNumber",
                    "StudyDescription", "PatientComments", "ModalitiesInStudy"):
        setattr(ds, keyword, "")
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _find(port: int, max_pdu: int, cancel_after: int = 0,
          again: bool = False) -> tuple[list[int], list[bytes], bytes, list[int]]:
    """(statuses, identifiers as received, the P-DATA PDUs received, statuses of a second
    C-FIND on the same association when ``again``)."""
    ae = ClientAE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(FIND)
    pdus: list[bytes] = []
    identifiers: list[bytes] = []

    def on_data(event: evt.Event) -> None:
        if event.data[:1] == b"\x04":
            pdus.append(bytes(event.data))

    def on_dimse(event: evt.Event) -> None:
        data = event.message.data_set
        if data is not None and data.getvalue():
            identifiers.append(data.getvalue())

    assoc = ae.associate(LOCAL, port, ae_title=AE, evt_handlers=[
        (evt.EVT_DATA_RECV, on_data), (evt.EVT_DIMSE_RECV, on_dimse)])
    assert assoc.is_established
    statuses: list[int] = []
    second: list[int] = []
    try:
        context_id = assoc.accepted_contexts[0].context_id
        for status, _ in assoc.send_c_find(_identifier(), FIND, msg_id=5):
            statuses.append(int(status.Status))
            if cancel_after and len(statuses) == cancel_after:
                assoc.send_c_cancel(5, context_id)
        if again:
            second = [int(s.Status) for s, _ in assoc.send_c_find(_identifier(), FIND, msg_id=6)]
    finally:
        assoc.release()
    return statuses, identifiers, b"".join(pdus), second


@pytest.mark.slow
@pytest.mark.parametrize("max_pdu", PDU_SIZES)
def test_pynetdicom_receives_the_same_pdus(env: Env, max_pdu: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(findwire, "ENABLED", enabled)
        before = env.wires()
        results[enabled] = (_find(env.port, max_pdu), env.wires() - before)
    (fast, fast_wires), (slow, slow_wires) = results[True], results[False]
    assert fast[:3] == slow[:3]
    statuses, identifiers, wire, _ = fast
    assert statuses == [0xFF00] * STUDIES + [0x0000]
    assert len(identifiers) == STUDIES and len(set(identifiers)) == STUDIES
    assert max(len(i) for i in identifiers) > 4096  # one answer over several 4096-byte PDUs
    # the path was taken, in a few writes: the first chunk with nothing after it held
    # back, then the second chunk with the final status
    assert slow_wires == 0 and 1 < fast_wires <= 4, fast_wires
    assert len(wire) > 0


def _dataset_part(data: bytes) -> bytes:
    """A findscu answer file without its file meta (whose instance UID findscu makes)."""
    start = 128 + 4 + 12 + int.from_bytes(data[140:144], "little")
    return data[start:]


@pytest.mark.slow
@pytest.mark.parametrize("pdu", ["4096", "16385"])
def test_findscu_writes_the_same_answers(env: Env, pdu: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    written = {}
    for enabled in (True, False):
        monkeypatch.setattr(findwire, "ENABLED", enabled)
        out = env.root / f"findscu-{pdu}-{enabled}"
        out.mkdir()
        keys = []
        for key in ("QueryRetrieveLevel=STUDY", "PatientName=FINDFAST^*", "StudyInstanceUID",
                    "PatientID", "StudyDate", "AccessionNumber", "PatientComments"):
            keys += ["-k", key]
        res = subprocess.run([dcmtk("findscu"), "-S", "-pdu", pdu, "-aet", CALLING, "-aec", AE,
                              *keys, "-X", "-od", str(out), LOCAL, str(env.port)],
                             capture_output=True, text=True, env=dcmtk_env(), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        written[enabled] = {p.name: _dataset_part(p.read_bytes()) for p in out.iterdir()}
    assert len(written[True]) == STUDIES
    assert written[True] == written[False]


@pytest.mark.slow
def test_cancel_on_the_first_answer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second chunk's answers come slowly (as from a slow index): a C-CANCEL sent on
    the first answer arrives before it, the C-FIND ends with Cancel after the first chunk,
    nothing more of it leaves, and the same association answers the next C-FIND in full."""
    engine = env.service.qr.engine
    real = engine.find_json

    def slow_second_chunk(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for n, answer in enumerate(real(*args, **kwargs)):
            if n >= qr.FIND_FIRST_CHUNK:
                time.sleep(0.1)
            yield answer

    monkeypatch.setattr(engine, "find_json", slow_second_chunk)
    for enabled in (True, False):
        monkeypatch.setattr(findwire, "ENABLED", enabled)
        statuses, identifiers, _wire, second = _find(env.port, 16385, cancel_after=1,
                                                     again=True)
        pending = len(statuses) - 1
        if enabled:  # the first chunk leaves in one write: the cancel comes after it
            assert pending == qr.FIND_FIRST_CHUNK
        else:  # one by one: the cancel may stop the first chunk too
            assert 1 <= pending <= qr.FIND_FIRST_CHUNK
        assert statuses == [0xFF00] * pending + [0xFE00]
        assert len(identifiers) == pending + STUDIES
        assert second == [0xFF00] * STUDIES + [0x0000]


@pytest.mark.slow
def test_findscu_cancel_after_the_first_answer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """dcmtk ``findscu --cancel 1`` against the same slow second chunk: it gets the first
    chunk, its C-CANCEL ends the C-FIND with Cancel, it exits cleanly."""
    engine = env.service.qr.engine
    real = engine.find_json

    def slow_second_chunk(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for n, answer in enumerate(real(*args, **kwargs)):
            if n >= qr.FIND_FIRST_CHUNK:
                time.sleep(0.1)
            yield answer

    monkeypatch.setattr(engine, "find_json", slow_second_chunk)
    out = env.root / "findscu-cancel"
    out.mkdir()
    res = subprocess.run([dcmtk("findscu"), "-v", "-S", "--cancel", "1", "-aet", CALLING,
                          "-aec", AE, "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "PatientName=FINDFAST^*", "-k", "StudyInstanceUID", "-X",
                          "-od", str(out), LOCAL, str(env.port)],
                         capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list(out.iterdir())) == qr.FIND_FIRST_CHUNK
    assert "Received Final Find Response (Cancel" in res.stdout + res.stderr


@pytest.mark.slow
def test_gdcmscu_receives_every_answer(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """GDCM as the SCU: a result check only (it aborts at association release here, see
    the interop notes, and prints no answer): its debug log says the C-FIND succeeded and
    counts one P-DATA message per answer plus the final status, the path on and off."""
    tool = shutil.which("gdcmscu")
    if tool is None:
        pytest.skip("gdcmscu not installed")
    for enabled in (True, False):
        monkeypatch.setattr(findwire, "ENABLED", enabled)
        res = subprocess.run([tool, "-D", "--find", "--studyroot", "--study", "--call", AE,
                              "--aetitle", CALLING, "--key", "10,10=FINDFAST^*",
                              "--key", "20,d=", LOCAL, str(env.port)],
                             capture_output=True, text=True, timeout=60, check=False)
        out = res.stdout + res.stderr
        assert "C-Find was successful" in out, out[-2000:]
        assert out.count("PDU code: 4") == STUDIES + 1


# --- negotiation: accepted and refused contexts ----------------------------------------------


def test_node_lookup_reads_what_the_orm_reads(env: Env) -> None:
    """The per-association node look-up (one Core read) gives what the ORM gives, and a
    change applies at once (nothing cached)."""
    from sqlalchemy import select

    from pacsvault.index.models import Node
    from pacsvault.index.nodes import _info

    nodes = env.vault.nodes
    nodes.add("LOOKUP", "127.0.0.9", 11112, roles=("query", "retrieve"))
    try:
        for ae in (CALLING, QUERY_ONLY, "LOOKUP", " LOOKUP ", "NOSUCH"):
            with env.vault.sessions() as session:
                row = session.scalar(select(Node).where(Node.ae_title == ae.strip()))
                expected = _info(row) if row else None
            assert nodes.get(ae) == expected
        nodes.remove("LOOKUP")
        assert nodes.get("LOOKUP") is None
    finally:
        if nodes.get("LOOKUP") is not None:
            nodes.remove("LOOKUP")


def _negotiated(assoc: Any) -> dict[str, Any]:
    """At EVT_ACCEPTED: what was asked, what the server shaped, what was answered."""
    rq = assoc.requestor.primitive
    return {
        "calling": str(rq.calling_ae_title).strip(),
        "requested": copy.deepcopy(rq.presentation_context_definition_list),
        "roles": {uid: (item.scu_role, item.scp_role)
                  for uid, item in assoc.requestor.role_selection.items()},
        "shaped": list(assoc.acceptor.supported_contexts),
        "result": _facts(assoc.accepted_contexts + assoc.rejected_contexts),
        "reply_roles": sorted(
            (str(i.sop_class_uid), i.scu_role, i.scp_role)
            for i in assoc.acceptor.primitive.user_information
            if type(i).__name__ == "SCP_SCU_RoleSelectionNegotiation"),
    }


def _facts(contexts: list[PresentationContext]) -> list[tuple[Any, ...]]:
    return sorted((cx.context_id, str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax],
                   cx.result, cx.as_scu, cx.as_scp) for cx in contexts)


def _expected(env: Env, negotiated: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """pynetdicom's own negotiation over the server's full list (the contexts the
    node may use; each asked context with the syntax order the server gave it)."""
    denied = qr.denied_contexts(env.vault.nodes.get(negotiated["calling"]).roles)
    shaped = {str(cx.abstract_syntax): cx for cx in negotiated["shaped"]}
    server = env.service.ae.supported_contexts
    full = [shaped.get(str(cx.abstract_syntax)) or copy.deepcopy(cx) for cx in server
            if str(cx.abstract_syntax) not in denied]
    result, roles = negotiate_as_acceptor(negotiated["requested"], full, negotiated["roles"])
    return _facts(result), sorted((str(r.sop_class_uid), r.scu_role, r.scp_role)
                                  for r in roles)


def _check_negotiation(env: Env, before: int) -> dict[str, Any]:
    assert wait_until(lambda: len(env.accepted) > before, 20, 0.05)
    negotiated = env.accepted[before]
    result, roles = _expected(env, negotiated)
    assert negotiated["result"] == result
    assert negotiated["reply_roles"] == roles
    # the server's own contexts (shared by every association) are never changed
    assert _server_contexts(env.service) == env.contexts
    return negotiated


@pytest.mark.slow
def test_getscu_proposal_negotiated_as_pynetdicom_would(env: Env) -> None:
    before = len(env.accepted)
    out = env.root / "getscu"
    out.mkdir()
    subprocess.run([dcmtk("getscu"), "-S", "-aet", CALLING, "-aec", AE, "-od", str(out),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={env.big_study}",
                    LOCAL, str(env.port)],
                   capture_output=True, text=True, env=dcmtk_env(), timeout=120, check=True)
    negotiated = _check_negotiation(env, before)
    assert len(negotiated["requested"]) > 50 and negotiated["roles"]
    assert sum(1 for r in negotiated["result"] if r[3] == 0) > 50
    assert len(list(out.iterdir())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["storescu", "findscu"])
def test_dcmtk_proposals_negotiated_as_pynetdicom_would(env: Env, tool: str) -> None:
    before = len(env.accepted)
    if tool == "storescu":
        path = env.root / "one.dcm"
        path.write_bytes(_study(99))
        args = [dcmtk("storescu"), "-aet", CALLING, "-aec", AE, LOCAL, str(env.port), str(path)]
    else:
        args = [dcmtk("findscu"), "-S", "-aet", CALLING, "-aec", AE, "-k",
                "QueryRetrieveLevel=STUDY", "-k", "PatientName=NOBODY", LOCAL, str(env.port)]
    subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=120,
                   check=True)
    _check_negotiation(env, before)


@pytest.mark.slow
def test_refused_role_and_unknown_class_negotiated_as_pynetdicom_would(env: Env) -> None:
    """A node with the query role only proposing GET (refused: not for its role), FIND,
    an unknown abstract syntax and a context offering no syntax we know."""
    before = len(env.accepted)
    ae = ClientAE(ae_title=QUERY_ONLY)
    ae.add_requested_context(FIND)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context("1.2.3.4.5.6")
    ae.add_requested_context(Verification, ["1.2.3.4.99"])
    assoc = ae.associate(LOCAL, env.port, ae_title=AE)
    assert assoc.is_established
    assoc.release()
    negotiated = _check_negotiation(env, before)
    assert [r[3] for r in negotiated["result"]] == [0, 3, 3, 4]
