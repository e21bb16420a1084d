"""Issue 16, scale-out ingest: the store batch's rows written straight to psycopg
(``storage.pgrows.DriverRows``) are the rows the SQLAlchemy path (``rows.BatchRows`` +
``rows.index_one``) writes for the same images.

Two sealed PostgreSQL databases under one master key (so the deterministic ``Fixed``
columns and the blind tokens are comparable byte for byte), one archive each, the same
images stored into both: a corpus with several patients, new series of studies already
committed (one bringing a new modality), re-sends in the same batch and later, a
conflicting object; then one CT series from four threads (several images per batch).
Compared per row, by natural keys: every decoded value (times only as present), the raw
``Fixed`` bytes, the raw ``Sealed`` lengths and version byte, the counters, and each row's
raw token set (same size; the deterministic tokens identical, only the random padding
differs).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, Table, column, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from pacsvault.crypto.keyring import Keyring
from pacsvault.crypto.keys import MasterKey
from pacsvault.index import blind, sealing
from pacsvault.index.keyrows import DataKeyRows
from pacsvault.index.models import (
    Base,
    Instance,
    Patient,
    Series,
    Study,
    patient_tokens,
    series_tokens,
    study_tokens,
)
from pacsvault.index.sealing import Fixed, Sealed
from pacsvault.storage import rows
from pacsvault.storage.archive import Archive, StoreStatus
from pacsvault.storage.objects import ObjectStore
from tests import corpus
from tests.harness.postgres import PostgresServer, create_database, drop_database
from tests.test_matching_backends import _datasets, _part10

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

_patients = cast(Table, Patient.__table__)
_studies = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_instances = cast(Table, Instance.__table__)
_TIMES = {"created", "received"}  # the moment of writing: compared as present only
_RANDOM = {"pk", "object_id", "key_id", "wrapped"}  # per archive by design


def _images(tmp: Path) -> tuple[list[bytes], list[bytes]]:
    """The matching corpus (sequential part) and a CT series of one study (threads)."""
    corpus_raws = [_part10(ds) for ds in _datasets()]
    ct = [p.read_bytes() for p in corpus.synthetic_ct_series(tmp / "ct", 24, size=16)]
    return corpus_raws, ct


def _conflicting(raw: bytes, tmp: Path) -> bytes:
    """Other bytes under the SOP Instance UID of ``raw``."""
    import io

    ds = dcmread(io.BytesIO(raw))
    ds.StudyDescription = "OTHER BYTES"
    out = tmp / "conflict.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out.read_bytes()


def _load(engine: Engine, objects: Path, raws: tuple[list[bytes], list[bytes]],
          conflict: bytes, *, reference: bool) -> list[str]:
    """Store everything; the statement texts SQLAlchemy saw (to tell the paths apart)."""
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    store = ObjectStore(objects)
    store.create()
    archive = Archive(sessions, store, Keyring(os.urandom(32), DataKeyRows()))
    if reference:
        archive._batch_rows = rows.BatchRows
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _k, statement, *_r: seen.append(statement))
    sequential, threaded = raws
    statuses = [archive.store(raw).status for raw in sequential]
    assert statuses == [StoreStatus.STORED] * len(sequential)
    assert archive.store(sequential[0]).status is StoreStatus.DUPLICATE
    assert archive.store(conflict).status is StoreStatus.CONFLICT
    again = threaded[:6] + threaded[:6] + threaded[6:]  # re-sends inside batches too
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: archive.store(r).status, again))
    assert got.count(StoreStatus.STORED) == len(threaded)
    assert set(got) <= {StoreStatus.STORED, StoreStatus.DUPLICATE}
    archive.settle()
    return seen


def _natural(table: Table, row: dict[str, Any]) -> Any:
    if table is _patients:
        return (row["patient_id"], row["issuer"])
    if table is _studies:
        return row["study_uid"]
    if table is _series:
        return row["series_uid"]
    return row["sop_uid"]


_PARENT = {"patients": None, "studies": ("patient_pk", "patients"),
           "series": ("study_pk", "studies"), "instances": ("series_pk", "series")}
_TOKENS = {"patients": patient_tokens, "studies": study_tokens, "series": series_tokens}


def _snapshot(engine: Engine) -> dict[str, Any]:
    """Every row by natural key: decoded values (parents by natural key), raw shapes of
    the sealed columns, raw token sets."""
    out: dict[str, Any] = {}
    by_pk: dict[str, dict[int, Any]] = {}
    with engine.connect() as conn:
        for table in (_patients, _studies, _series, _instances):
            decoded = {r["pk"]: dict(r) for r in conn.execute(select(table)).mappings()}
            raw = {r["pk"]: dict(r) for r in conn.execute(
                select(*(column(c.name) for c in table.c)).select_from(table)).mappings()}
            keys = {pk: _natural(table, row) for pk, row in decoded.items()}
            by_pk[table.name] = keys
            rows_out: dict[Any, Any] = {}
            for pk, row in decoded.items():
                values: dict[str, Any] = {}
                for c in table.c:
                    name, value = c.name, row[c.name]
                    parent = _PARENT[table.name]
                    if parent is not None and name == parent[0]:
                        values[name] = by_pk[parent[1]][value]
                    elif name in _TIMES:
                        assert isinstance(value, dt.datetime) and value.tzinfo is not None
                    elif name not in _RANDOM:
                        values[name] = value
                    blob = raw[pk][name]
                    if isinstance(c.type, Fixed):
                        values[f"raw:{name}"] = bytes(blob)
                    elif isinstance(c.type, Sealed) or name in _TIMES:
                        values[f"raw:{name}"] = (bytes(blob)[:1], len(bytes(blob)))
                rows_out[keys[pk]] = values
            out[table.name] = rows_out
            tokens = _TOKENS.get(table.name)
            if tokens is not None:
                sets: dict[Any, set[bytes]] = {}
                for token, row_pk in conn.execute(select(tokens.c.token, tokens.c.row_pk)):
                    sets.setdefault(keys[row_pk], set()).add(bytes(token))
                out[f"tokens:{table.name}"] = sets
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
           ) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[str], list[str],
                               sealing.Sealer]]:
    root = tmp_path_factory.mktemp("driverrows")
    raws = _images(root)
    conflict = _conflicting(raws[0][3], root)
    sealer = sealing.sealer_for(MasterKey.generate(), "vault-driver-rows")
    snapshots, seen, dbs, engines = [], [], [], []
    try:
        for name, reference in (("driver", False), ("reference", True)):
            db = create_database(postgres_server)
            dbs.append(db)
            url = make_url(db.url).set(drivername="postgresql+psycopg")
            engine = create_engine(url, connect_args={"password": postgres_server.password()})
            engines.append(engine)
            sealing.attach(engine, sealer)
            seen.append(_load(engine, root / name, raws, conflict, reference=reference))
            snapshots.append(_snapshot(engine))
        yield snapshots[0], snapshots[1], seen[0], seen[1], sealer
    finally:
        for engine in engines:
            engine.dispose()
        for db in dbs:
            drop_database(db)


def test_the_two_paths_were_taken(loaded: Any) -> None:
    _, _, driver_seen, reference_seen, _ = loaded
    assert any("INSERT INTO instances" in s for s in reference_seen)
    assert not any("INSERT INTO instances" in s or "INSERT INTO studies" in s
                   for s in driver_seen)


def test_rows_are_the_same_decoded_and_raw(loaded: Any) -> None:
    driver, reference, _, _, _ = loaded
    headers = {v["meta_json"] for v in driver["instances"].values()}
    for table in ("patients", "studies", "series", "instances"):
        assert driver[table].keys() == reference[table].keys(), table
        for key, values in reference[table].items():
            got, want = dict(driver[table][key]), dict(values)
            if table != "instances" and got["meta_json"] != want["meta_json"]:
                # The threaded series' patient, study and series rows: made by whichever
                # of the first images stored at once was indexed first, in each archive
                # (a race per archive, not a difference of paths): one of its headers.
                assert got["meta_json"] in headers and want["meta_json"] in headers
                for row in (got, want):
                    del row["meta_json"], row["raw:meta_json"]
            assert got == want, (table, key)
    assert len(driver["instances"]) == len(reference["instances"]) > 40
    # the corpus's study with a CT then an SR series, written in two batches
    modalities = {v["modalities"] for v in driver["studies"].values()}
    assert "CT\\SR" in modalities


def test_token_sets_are_the_same(loaded: Any) -> None:
    driver, reference, _, _, sealer = loaded
    for level, fields in (
            ("patients", (("PatientName", "name_norm"), ("PatientBirthDate", "birth_date"))),
            ("studies", (("StudyDate", "study_date"),
                         ("ReferringPhysicianName", "referring_physician_norm"))),
            ("series", (("SeriesDate", "series_date"),
                        ("PerformedProcedureStepStartDate", "performed_start_date")))):
        mine, theirs = driver[f"tokens:{level}"], reference[f"tokens:{level}"]
        assert mine.keys() == theirs.keys() == driver[level].keys(), level
        for key, tokens in theirs.items():
            values = {k: driver[level][key][c] or "" for k, c in fields}
            # what any writer derives from these values (padding aside): twice, and
            # only what both draws share
            fixed = blind.row_tokens(sealer, values) & blind.row_tokens(sealer, values)
            assert len(mine[key]) == len(tokens), (level, key)
            assert mine[key] & tokens == fixed, (level, key)
