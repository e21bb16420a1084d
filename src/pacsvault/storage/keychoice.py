"""Which data key a store encrypts under when its study is not cached.

Why apart from ``archive``: this is the part of a store that used to be a write
transaction of its own (``Archive._prepare``: lock, look-ups, a new patient's key and row,
commit and fsync) and now only reads (issue 17, ingest). A patient not in the index gets
a data key *minted* in memory (``Keyring.mint``); its row and the patient's are written
by the group commit with the instance's (``rows.index_one``), so they are durable exactly
when the instance is, and a refused commit leaves neither.

Concurrent stores of one new patient share the key minted first (``MintedKeys``, until
the commit naming it is over), so a patient keeps one key in the usual case; a store that
looked before that commit and minted after it, or another process creating the patient
meanwhile, adds a key of theirs (removal and erasure follow every instance's own key).

On PostgreSQL (issue 16, scale-out ingest) the look-up is **one** statement (scalar
subqueries sent straight to psycopg, the UIDs and IDs bound by their ``Fixed`` column
types: encrypted as SQLAlchemy would bind them) on an autocommit connection: one round
trip, no BEGIN/COMMIT, no advisory lock, and one snapshot, so the generation and the rows
it guards are read together. Other instances sharing the index may create the same new
patient meanwhile: the batch reads the patient under the index's write lock and inserts
with ``ON CONFLICT DO NOTHING`` (``rows._new_patient``, ``pgrows``), so two instances
minting for one patient give one patient row.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Connection, Table

from pacsvault.crypto.keyring import Keyring
from pacsvault.dicomfile.parse import ParsedInstance
from pacsvault.index import dialect
from pacsvault.index.models import Instance, Patient, Study
from pacsvault.storage import pgrows, rows
from pacsvault.storage.rows import StoreResult

GENERATION = "SELECT coalesce(max(id), 0) FROM object_actions"
_instances = cast(Table, Instance.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)


@dataclass(frozen=True)
class Found:
    """What the index says, read after the removal generation (``generation``)."""

    generation: int
    known: StoreResult | None = None  # the instance is stored already
    study: tuple[int, uuid.UUID] | None = None  # (study pk, its patient's key)
    patient_key: uuid.UUID | None = None  # the patient is known, the study is not


def look_up(conn: Connection, parsed: ParsedInstance) -> Found:
    """Plain reads through the driver: no write lock, no transaction to commit. The
    generation is read first, so a removal committing in between is noticed by the
    batch (``Archive._index_batch``)."""
    if conn.dialect.name != "sqlite":
        return _look_up_one(conn, parsed)
    # One statement, as on PostgreSQL (issue 17: four statements were a fifth of a
    # one-instance study's index work): one snapshot, so the generation and the rows it
    # guards are read together.
    cursor = conn.connection.cursor()
    try:
        generation, digest, study_pk, study_key, patient_key = cursor.execute(
            _ONE_SQLITE, (parsed.sop_uid, parsed.study_uid, parsed.study_uid,
                          parsed.patient_id, parsed.issuer)).fetchone()
    finally:
        cursor.close()
    return _found(parsed, generation, digest, study_pk, study_key, patient_key)


def _found(parsed: ParsedInstance, generation: object, digest: bytes | None,
           study_pk: object, study_key: str | None, patient_key: str | None) -> Found:
    """``Found`` from the one statement's columns (both dialects)."""
    generation = int(cast(int, generation))
    if digest is not None:
        return Found(generation, known=rows.answer(parsed, digest))
    if study_pk is not None and study_key is not None:
        return Found(generation, study=(int(cast(int, study_pk)), uuid.UUID(study_key)))
    return Found(generation,
                 patient_key=None if patient_key is None else uuid.UUID(patient_key))


_ONE = (f"SELECT ({GENERATION}), "  # noqa: S608 (the code's own statement)
        "(SELECT sha256 FROM instances WHERE sop_uid = %s), "
        "(SELECT pk FROM studies WHERE study_uid = %s), "
        "(SELECT patients.key_id FROM patients JOIN studies "
        "ON studies.patient_pk = patients.pk WHERE studies.study_uid = %s), "
        "(SELECT key_id FROM patients WHERE patient_id = %s AND issuer = %s)")


_ONE_SQLITE = _ONE.replace("%s", "?")


def _look_up_one(conn: Connection, parsed: ParsedInstance) -> Found:
    """``look_up`` as one statement (PostgreSQL: see the module docstring), straight to
    psycopg; the ``Fixed`` UIDs and IDs bound by their column types
    (``pgrows.bound``), the answer's columns plain (pk, key id, digest)."""
    study_uid = pgrows.bound(conn.dialect, _studies, "study_uid", parsed.study_uid)
    (row,) = dialect.run_driver(conn, _ONE, (
        pgrows.bound(conn.dialect, _instances, "sop_uid", parsed.sop_uid), study_uid,
        study_uid, pgrows.bound(conn.dialect, _patients, "patient_id", parsed.patient_id),
        pgrows.bound(conn.dialect, _patients, "issuer", parsed.issuer)))
    return _found(parsed, *row)


class MintedKeys:
    """Keys minted for patients whose rows are not committed yet, by (ID, issuer)."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._lock = threading.Lock()
        self._minted: dict[tuple[str, str], tuple[uuid.UUID, bytes]] = {}

    def take(self, parsed: ParsedInstance) -> tuple[uuid.UUID, bytes]:
        """(key id, key): the one minted for this patient, or a new one (wrapped only
        inside the commit that writes its row: ``Keyring.wrap``)."""
        patient = (parsed.patient_id, parsed.issuer)
        with self._lock:
            minted = self._minted.get(patient)
            if minted is None:
                minted = self._minted[patient] = self._keyring.mint()
            return minted

    def release(self, parsed: ParsedInstance, key_id: uuid.UUID) -> None:
        """The commit naming this key is over: from now on the patient is found in the
        index (had it failed, the next store mints again; the stores still holding the
        key write its row themselves)."""
        patient = (parsed.patient_id, parsed.issuer)
        with self._lock:
            current = self._minted.get(patient)
            if current is not None and current[0] == key_id:
                del self._minted[patient]
