"""Which data key a store encrypts under when its study is not cached (SQLite index).

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
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection

from pacsvault.crypto.keyring import Keyring
from pacsvault.dicomfile.parse import ParsedInstance
from pacsvault.storage import rows
from pacsvault.storage.rows import StoreResult

GENERATION = "SELECT coalesce(max(id), 0) FROM object_actions"
_STUDY_KEY = ("SELECT studies.pk, patients.key_id FROM studies JOIN patients "
              "ON studies.patient_pk = patients.pk WHERE studies.study_uid = ?")
_PATIENT_KEY = "SELECT key_id FROM patients WHERE patient_id = ? AND issuer = ?"


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
    cursor = conn.connection.cursor()
    try:
        generation = int(cursor.execute(GENERATION).fetchone()[0])
        known = rows.known(conn, parsed)
        if known is not None:
            return Found(generation, known=known)
        row = cursor.execute(_STUDY_KEY, (parsed.study_uid,)).fetchone()
        if row is not None:
            return Found(generation, study=(int(row[0]), uuid.UUID(row[1])))
        row = cursor.execute(_PATIENT_KEY, (parsed.patient_id, parsed.issuer)).fetchone()
    finally:
        cursor.close()
    return Found(generation, patient_key=None if row is None else uuid.UUID(row[0]))


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
