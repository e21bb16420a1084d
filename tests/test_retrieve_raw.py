"""Issue 17, part 4: the pieces of retrieval without re-encoding (``dicom/retrieve``).

The end-to-end byte identity (pynetdicom and dcmtk ``getscu`` C-GET, C-MOVE into dcmtk
``storescp``) is in ``tests/test_transcode_send.py``; these check the parts in isolation:
the Part 10 split agrees with pydicom, the encode hook refuses an encoding that is not
the stored one, and the read-ahead keeps order, hands exceptions over and stays bounded.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacsvault.dicom import retrieve, sendpath
from tests import corpus


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[corpus.CorpusFile]:
    return corpus.build(tmp_path_factory.mktemp("raw"))


def test_split_agrees_with_pydicom_for_the_corpus(files: list[corpus.CorpusFile]) -> None:
    for f in files:
        data = f.path.read_bytes()
        found = retrieve.split(data)
        assert found is not None, f.path.name
        syntax, offset = found
        fp = io.BytesIO(data)
        ds = dcmread(fp, stop_before_pixels=True)
        assert syntax == str(ds.file_meta.TransferSyntaxUID) == f.transfer_syntax
        meta_end = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        assert offset == meta_end, f.path.name


@pytest.mark.parametrize("data", [
    b"", b"\0" * 132, b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"])
def test_split_refuses_what_is_not_a_plain_part10_stream(data: bytes) -> None:
    assert retrieve.split(data) is None


def test_hook_sends_stored_bytes_only_in_the_stored_encoding() -> None:
    raw = retrieve.Raw("1.2.840.10008.5.1.4.1.1.7", "1.2.3", JPEGBaseline8Bit, b"body")
    assert retrieve._encode_hook(raw, False, True, False) == b"body"
    assert retrieve._encode_hook(raw, True, True, False) is None  # implicit asked: refused
    deflated = retrieve.Raw("1.2.840.10008.5.1.4.1.1.7", "1.2.3",
                            DeflatedExplicitVRLittleEndian, b"z")
    assert retrieve._encode_hook(deflated, False, True, True) == b"z"
    assert retrieve._encode_hook(deflated, False, True, False) is None
    plain = retrieve.Raw("1.2.840.10008.5.1.4.1.1.7", "1.2.3", ExplicitVRLittleEndian, b"")
    other = object()
    assert retrieve._encode_hook(other, False, True, False) is other
    assert "1.2.3" not in repr(plain)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGBaseline8Bit,
                                    DeflatedExplicitVRLittleEndian])
def test_raw_is_the_dataset_pydicom_would_build(syntax: str) -> None:
    """``Raw`` is built without pydicom's ``__init__``/``setattr`` (issue 17): same
    elements, same values once read, same instance state as one built the usual way."""
    sop_class, sop_uid = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.2.1125.12345"
    raw = retrieve.Raw(sop_class, sop_uid, syntax, memoryview(b"\0\0"))
    usual = Dataset()
    usual.SOPClassUID, usual.SOPInstanceUID = sop_class, sop_uid
    usual.file_meta = FileMetaDataset()
    usual.file_meta.TransferSyntaxUID = UID(syntax)
    assert raw.SOPClassUID == usual.SOPClassUID and raw.SOPInstanceUID == sop_uid
    assert raw.file_meta.TransferSyntaxUID == syntax
    assert raw.file_meta.TransferSyntaxUID.is_little_endian
    assert dict(raw._dict) == dict(usual._dict) and raw.file_meta == usual.file_meta
    assert "SOPInstanceUID" in raw and len(raw) == 2 and isinstance(raw.file_meta,
                                                                    FileMetaDataset)
    assert raw.__dict__["pv_uids"] == (sop_class, sop_uid, syntax)
    assert set(raw.__dict__) - set(usual.__dict__) == {"pv_uids", "pv_body"}
    for blank, made in ((sendpath.blank(Dataset), Dataset()),
                        (sendpath.blank(FileMetaDataset), FileMetaDataset())):
        assert type(blank) is type(made) and blank.__dict__ == made.__dict__
        for key, value in blank.__dict__.items():  # no container shared between two
            if isinstance(value, dict | list):
                assert value is not sendpath.blank(type(made)).__dict__[key]


def test_raws_share_no_state_that_one_of_them_can_change() -> None:
    """Two ``Raw`` of the same SOP class and syntax share their (immutable) raw UI
    elements (``retrieve._shared_ui``): changing one dataset leaves the other as made."""
    body = memoryview(b"\0" * 8)
    one = retrieve.Raw(CTImageStorage, "1.2.3.1", ExplicitVRLittleEndian, body)
    two = retrieve.Raw(CTImageStorage, "1.2.3.2", ExplicitVRLittleEndian, body)
    one.SOPClassUID = "1.2.3.99"
    one.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    one.PatientID = "X"
    assert two.SOPClassUID == CTImageStorage and two.SOPInstanceUID == "1.2.3.2"
    assert two.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "PatientID" not in two and len(two) == 2
    assert retrieve.Raw(CTImageStorage, "1.2.3.3", ExplicitVRLittleEndian,
                        body).SOPClassUID == CTImageStorage


def test_read_ahead_keeps_order_hands_exceptions_and_is_bounded() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def read(n: int) -> int:
        with lock:
            started.append(n)
        if n == 3:
            raise OSError("unreadable")
        return n * 10

    ahead = retrieve.ReadAhead(list(range(8)), read, depth=2)
    seen = []
    for n, result in ahead:
        time.sleep(0.02)  # the worker had time to run ahead as far as it may
        with lock:
            assert max(started) <= n + 2  # never more than ``depth`` ahead
        seen.append((n, result))
    assert [n for n, _ in seen] == list(range(8))
    assert isinstance(seen[3][1], OSError)
    assert [r for n, r in seen if n != 3] == [n * 10 for n in range(8) if n != 3]


def test_read_ahead_closed_early_reads_no_further(tmp_path: Path) -> None:
    calls: list[int] = []
    ahead = retrieve.ReadAhead(list(range(100)), calls.append, depth=1)
    for n, _ in ahead:
        if n == 2:
            break
    ahead.close()
    time.sleep(0.05)
    assert max(calls) <= 4
