"""Issue 17, peak memory during ingest: how many copies of an image in flight are alive.

A CR is ~10 MB and every association has one in flight: the receive buffer is emptied as
soon as the stream is taken from it (``dicom/server._taken``), and the parsed dataset
(its own copy of the pixels) is gone before the object is staged and the group commit is
waited for (``Archive._store_once``). Checked by what is alive, never by a size or a time.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from pacsvault.dicom import server
from pacsvault.dicomfile import parse as dicom_parse
from pacsvault.storage.archive import StoreStatus
from pacsvault.vault import Vault, create
from tests import corpus


def test_the_receive_buffer_is_emptied_when_taken() -> None:
    pdu = bytearray(b"\x01\x02" * 1000)
    stream: list[bytes | memoryview] = [b"meta", memoryview(pdu)[6:], b"end"]
    data = server._taken(stream)
    assert data == b"meta" + b"\x01\x02" * 997 + b"end" and isinstance(data, bytes)
    assert len(stream) == 0
    pdu.extend(b"x")  # no view of the PDU is left alive (a held view forbids resizing)


@pytest.fixture
def vault(tmp_path: Path) -> Any:
    create(tmp_path / "data", key_file=tmp_path / "key")
    opened = Vault.open(tmp_path / "data", tmp_path / "key")
    yield opened
    opened.close()


@pytest.mark.parametrize("known_study", [False, True])
def test_the_parsed_dataset_is_gone_before_the_commit(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        known_study: bool) -> None:
    files = corpus.synthetic_ct_series(tmp_path / "ct", 2, size=16)
    raws = [f.read_bytes() for f in files]
    if known_study:  # the study's key cached: staging runs beside the validation
        assert vault.archive.store(raws[0]).status is StoreStatus.STORED
    datasets: list[weakref.ref[Any]] = []
    read = dicom_parse.read_received

    def recording_read(raw: bytes) -> Any:
        ds = read(raw)  # a pydicom dataset or a ``fastparse.Header``
        datasets.append(weakref.ref(ds))
        return ds

    alive_at_commit: list[bool] = []
    commit = vault.archive._commit

    def checking_commit(pending: Any) -> None:
        gc.collect()
        alive_at_commit.append(any(ref() is not None for ref in datasets))
        commit(pending)

    monkeypatch.setattr(dicom_parse, "read_received", recording_read)  # the archive's reader
    monkeypatch.setattr(vault.archive, "_commit", checking_commit)
    result = vault.archive.store(raws[1])
    assert result.status is StoreStatus.STORED
    assert datasets and alive_at_commit == [False]
    # and what was stored is what was sent
    assert dcmread(files[1]).SOPInstanceUID == result.sop_uid
