"""The embedded index's store rows (``rows._index_sqlite``, issue 17: fewer statements per
image) are exactly the reference path's (``rows._index_general``).

Why: the fast path reads everything in one statement and inserts a new study or series
with its final counters and modalities instead of inserting then updating; a slip there
(a counter off by one, a modality lost, an instance filed under the wrong series) would
only show later in C-FIND/QIDO answers. The same instances, in the same batches (several
items per batch, a UID twice in one batch, caches warm and cold), go into two fresh
vaults, one of them forced onto the reference path, and every row must be the same.
"""

from __future__ import annotations

import copy
import io
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text

from pacsvault.dicomfile import parse
from pacsvault.storage import rows
from pacsvault.storage.archive import Archive, StoreResult
from pacsvault.storage.rows import Pending, StoreStatus
from pacsvault.vault import Vault, create
from tests import corpus


def _instance(template: Dataset, *, patient: str, study: str, series: str,
              modality: str, number: int) -> bytes:
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
    ds.Modality, ds.InstanceNumber = modality, number
    if not modality:
        del ds.Modality
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _batches(tmp: Path) -> list[list[bytes]]:
    """Batches of instances covering every branch: new patient/study/series, a study
    gaining a series with a new modality or a known one, a known series, a study without
    modality, a series UID reused under another study, a UID twice in one batch."""
    template = dcmread(corpus.synthetic_ct_series(tmp / "t", 1, size=8)[0])
    a, b, c, d = (generate_uid() for _ in range(4))
    a1, a2, a3, b1, c1 = (generate_uid() for _ in range(5))

    def one(patient: str, study: str, series: str, modality: str, n: int) -> bytes:
        return _instance(template, patient=patient, study=study, series=series,
                         modality=modality, number=n)

    twice = one("P2", c, c1, "CT", 1)
    return [
        [one("P1", a, a1, "CT", 1), one("P1", a, a1, "CT", 2), one("P1", a, a2, "MR", 1)],
        [one("P1", a, a3, "CT", 1), one("P1", a, a1, "CT", 3)],  # caches warm
        [one("P1", b, b1, "", 1), twice, twice, one("P2", c, c1, "CT", 2)],
        [one("P1", a, a2, "MR", 2), one("P2", d, a1, "US", 1)],  # caches cold (forget)
        [one("P3", d, generate_uid(), "US", 1), one("P1", a, generate_uid(), "US", 1)],
    ]


def _ingest(archive: Archive, batches: list[list[bytes]]) -> list[str]:
    """Commit each batch as one group commit would (one transaction); the outcomes."""
    outcomes = []
    for k, raws in enumerate(batches):
        if k == 3:
            archive.forget()
        batch = []
        for raw in raws:
            parsed = parse.parse(raw)
            chosen = archive._choose(parsed)
            assert not isinstance(chosen, StoreResult)
            key_id, generation, minted = chosen
            batch.append(Pending(parsed, secrets.token_hex(16), key_id, "SCU",
                                 generation, new_key=minted))
        archive._run_batch(lambda b=batch: b)  # type: ignore[misc]
        for item in batch:
            if item.new_key is not None:
                archive._minted.release(item.parsed, item.key_id)
            assert item.error is None, item.error
            outcomes.append("stored" if item.result is None else item.result.status.value)
    return outcomes


_REFERENCE: Callable[..., None] = rows._index_general


def _general(*args: Any) -> None:
    """``_index_sqlite``'s arguments, given to the reference path (no ``BatchRows``)."""
    _REFERENCE(*args, None)


_DUMPS = {
    "patients": "SELECT patient_id, issuer, name, name_norm, birth_date, sex, meta_json, "
                "(SELECT count(DISTINCT key_id) FROM instances JOIN series ON "
                "instances.series_pk = series.pk JOIN studies ON series.study_pk = studies.pk "
                "WHERE studies.patient_pk = patients.pk), typeof(created), length(created) "
                "FROM patients",
    "studies": "SELECT study_uid, patients.patient_id, modalities, num_series, num_instances, "
               "study_date, study_time, accession_number, description, "
               "referring_physician_norm, studies.meta_json, typeof(studies.created), "
               "length(studies.created) FROM studies "
               "JOIN patients ON studies.patient_pk = patients.pk",
    "series": "SELECT series_uid, studies.study_uid, modality, series_number, "
              "series.num_instances, series_date, series.meta_json FROM series "
              "JOIN studies ON series.study_pk = studies.pk",
    "instances": "SELECT sop_uid, series.series_uid, sop_class_uid, instance_number, "
                 "transfer_syntax, rows, columns, content_date, size, sha256, source_ae, "
                 "instances.meta_json FROM instances JOIN series ON "
                 "instances.series_pk = series.pk",
    "keys": "SELECT typeof(created), length(created), length(wrapped), destroyed "
            "FROM data_keys",
}


def _dump(vault: Vault) -> dict[str, list[tuple[Any, ...]]]:
    with vault.engine.connect() as conn:
        return {name: sorted(tuple(r) for r in conn.execute(text(sql)))
                for name, sql in _DUMPS.items()}


def test_fast_rows_equal_the_reference_rows(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _batches(tmp_path)
    dumps, outcomes = [], []
    for name in ("fast", "reference"):
        if name == "reference":
            monkeypatch.setattr(rows, "_index_sqlite", _general)
        create(tmp_path / name / "data", key_file=tmp_path / name / "key")
        vault = Vault.open(tmp_path / name / "data", tmp_path / name / "key")
        try:
            outcomes.append(_ingest(vault.archive, batches))
            dumps.append(_dump(vault))
        finally:
            vault.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].count(StoreStatus.DUPLICATE.value) == 1
    fast, reference = dumps
    assert fast == reference
    # and the counters are right, not just equal
    studies = {row[0]: row for row in fast["studies"]}
    assert sum(row[4] for row in fast["studies"]) == len(fast["instances"]) == 12
    assert sorted(row[2] for row in studies.values()) == ["", "CT", "CT\\MR\\US", "US"]
