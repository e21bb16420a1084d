"""The archive: where a received object becomes durable, encrypted and indexed.

Order matters for "nothing lost": parse and validate in memory, encrypt, stage the object
file durably, commit its index row, publish the file. Only when ``store`` returns may the
caller acknowledge success. ``ObjectStore.recover`` settles a crash at any point.

Speed without weakening that order:

- the index is written with SQLAlchemy Core, one write transaction per image, and the
  study/series primary keys (and the study's data key id) are cached in memory once
  their rows are *committed*. Rows are deleted only by ``storage.removal`` (an admin's
  delete or quarantine, possibly from another process): each such change raises the
  index's removal generation (``object_actions``). Cache entries are tagged with the
  generation they were read at, every commit batch reads it first in its write
  transaction, and a store whose study/key choice predates a removal is redone from
  scratch (never indexed under a deleted row or a destroyed key);
- objects are staged into pre-created spare files (``ObjectStore.write_spare``): one fsync
  of the object file makes it durable, no directory fsync per object. When the study's
  data key is already known, encrypting, writing and hashing run in a worker thread while
  the calling thread validates the dataset and builds its DICOM JSON. The object's fsync
  runs in a worker while the group commit writes the rows and the store record (issue
  17: on one association an image waited for three fsyncs in a row: object, trail,
  index); the transaction commits only once it returned (``Pending.durable``). An
  object of at most ``_INLINE_MAX`` bytes skips the workers when other stores are under
  way (``_inline``): staged and fsync'ed by the calling thread before it queues;
- a study not cached is looked up by reads only; a new patient's data key is minted in
  memory and its rows are written by the group commit with the instance's
  (``storage.keychoice``: no transaction and no fsync of their own; on PostgreSQL one
  round trip, and the batch's rows go straight to psycopg in a few statements,
  ``storage.pgrows``);
- **group commit** (``storage.group_commit``): concurrent stores (several associations)
  hand their staged objects to whichever of them is committing; that one writes every row
  in one transaction. Each ``store`` still returns only after the commit that holds its
  own row;
- publishing (the rename into ``ab/cd/``) runs in a worker after ``store`` returned and is
  not fsync'ed: a crash leaves the object either published or still staged and named by
  the index, which reads find and ``recover`` publishes at the next start.

What one instance's rows are (study/series get-or-create, the instance row, counters, a
known UID's answer) lives in ``storage.rows``; reads select through the query engine
(``QueryEngine.stored``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from sqlalchemy import Engine, Table, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.audit.stores import StoreJournal
from pacsvault.crypto import objects as objfmt
from pacsvault.crypto.keyring import KeyDestroyed, Keyring
from pacsvault.dicomfile import parse as dicom_parse
from pacsvault.dicomfile.parse import InvalidObject, ParsedInstance
from pacsvault.index import dialect, stats
from pacsvault.index.matching import normalise_date, normalise_name
from pacsvault.index.models import Instance, Patient
from pacsvault.index.query import QueryEngine
from pacsvault.index.records import StoredInstance as StoredInstance  # re-exported
from pacsvault.storage import keychoice, rows, sameness
from pacsvault.storage.commit_link import CommitOutcomeUnknown
from pacsvault.storage.group_commit import _GATHER_MAX_BYTES, GroupCommit
from pacsvault.storage.objects import ObjectBackend, ObjectStore, Recovery
from pacsvault.storage.rows import Pending
from pacsvault.storage.rows import StaleChoice as StaleChoice  # re-exported
from pacsvault.storage.rows import StoreResult as StoreResult  # re-exported
from pacsvault.storage.rows import StoreStatus as StoreStatus  # re-exported

log = logging.getLogger("pacsvault.storage")

_HEADER_OVERHEAD = 4096
# An object this small, while other stores are under way (``Archive._inline``), is
# encrypted, written and fsync'ed by the storing thread itself, never handed to a worker
# (issue 17, one-instance studies of 64x64 MR over four associations: each hand-off to
# the ``archive-stage`` pool cost ~5 context switches and the interpreter's lock taken
# back twice, more than the ~0.1 ms of encryption and the fsync it overlapped; 55 -> 45
# switches and ~-10 % CPU per image). A larger one still goes to a worker, beside this
# thread's hash and rows (a 512x512 CT slice: its encryption and fsync are worth
# overlapping). The group commit's own bound for a small store: only those are counted
# in flight (``_inline`` reads that count) and a committer waits for them, fsync included.
_INLINE_MAX = _GATHER_MAX_BYTES
_GENERATION = keychoice.GENERATION
# The data key chosen for an instance: its id, the removal generation the choice was
# valid at, and for a patient first seen here the minted (unwrapped) key, else None.
_Chosen = tuple[uuid.UUID, int, bytes | None]
_STORE_ATTEMPTS = 3
# A staged object: its id and the fsync still to run
_Staged = tuple[str, "Callable[[], None] | None"]


class Archive(GroupCommit):
    def __init__(
        self, sessions: sessionmaker[Session], objects: ObjectBackend, keyring: Keyring
    ) -> None:
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("the archive needs a sessionmaker bound to an engine")
        self._engine: Engine = bind
        self.objects = objects
        self._keyring = keyring
        self._query = QueryEngine(sessions)
        # SQLite has one writer at a time anyway; taking the lock here keeps the
        # get-or-create of patients, studies and series free of races between associations.
        self._write_lock = threading.Lock()
        # Committed rows only: study UID -> (study pk, data key id); series UID -> pk.
        self._study_cache: dict[str, tuple[int, uuid.UUID]] = {}
        self._series_cache: dict[str, int] = {}
        # Committed rows only: a patient (``_patient_key``: a keyed hash of ID and issuer,
        # no identifier kept in memory) -> a data key of theirs, for a new study of a
        # patient already seen (``_store_once``).
        self._patient_cache: dict[bytes, uuid.UUID] = {}
        self._patient_salt = secrets.token_bytes(16)
        self._generation = -1  # removal generation the caches are valid at (-1: unknown)
        self._cache_lock = threading.Lock()
        self._minted = keychoice.MintedKeys(keyring)  # new patients' keys until committed
        self._init_group_commit()
        # How SQLAlchemy stores a DateTime on this engine, for the driver-level insert.
        received = cast(Table, Instance.__table__).c.received
        processor = received.type.bind_processor(self._engine.dialect)
        self._received: Callable[[Any], Any] = processor or (lambda value: value)
        self._publishing: set[Future[None]] = set()
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="archive-stage")
        # Records every committed batch in the audit trail, inside its transaction (set by
        # the vault; None only for an archive used without a trail).
        self.journal: StoreJournal | None = None

    def forget(self) -> None:
        """Drop the in-memory caches (after rows were removed or changed elsewhere)."""
        with self._cache_lock:
            self._study_cache.clear()
            self._series_cache.clear()
            self._patient_cache.clear()
            self._generation = -1
        self._keyring.forget_all()

    def _observe(self, generation: int) -> None:
        """Caller holds ``_cache_lock``. A removal happened since the caches were filled:
        drop them (and the unwrapped data keys: one may have been destroyed)."""
        if generation != self._generation:
            self._study_cache.clear()
            self._series_cache.clear()
            self._patient_cache.clear()
            self._generation = generation
            self._keyring.forget_all()

    def store(
        self,
        raw: bytes,
        *,
        source_ae: str = "",
        expected_sop_uid: str | None = None,
        expected_sop_class: str | None = None,
        actor_address: str = "",
        actor_user: str = "",
    ) -> StoreResult:
        """Store a Part 10 byte stream exactly as received (see ``_store_once``); redone
        when a removal made its study/key choice stale meanwhile."""
        for attempt in range(_STORE_ATTEMPTS):
            self._arrive(len(raw))  # a committer may wait for it (``GroupCommit._gather``)
            try:
                result = self._store_once(raw, source_ae=source_ae,
                                          expected_sop_uid=expected_sop_uid,
                                          expected_sop_class=expected_sop_class,
                                          actor_address=actor_address, actor_user=actor_user)
            except StaleChoice:
                if attempt == _STORE_ATTEMPTS - 1:
                    raise
                continue
            finally:
                self._depart()
            if result.status is StoreStatus.CONFLICT:
                return self._reencoded(result, raw, source_ae=source_ae,
                                       actor_address=actor_address, actor_user=actor_user)
            return result
        raise AssertionError("unreachable")

    def _reencoded(self, conflict: StoreResult, raw: bytes, *, source_ae: str,
                   actor_address: str, actor_user: str) -> StoreResult:
        """Other bytes under a known SOP Instance UID: the same instance re-encoded (an
        Orthanc round trip, a decompression...) is a benign duplicate, recorded as such
        (``*.store.duplicate``, informational); anything else stays the conflict (B006
        and a security event, by the caller). Keep-first either way: the stored object is
        only read (decrypted in memory), never changed. Outside every lock: decoding may
        take a while, and ``sameness`` bounds its size."""
        try:
            found = list(self.locate(sop_uid=conflict.sop_uid))
            verdict = (sameness.same_instance(self.read(found[0]), raw)
                       if len(found) == 1 else None)
        except Exception as exc:  # unreadable or tampered stored object: stay conservative
            log.warning("re-encoding check skipped (%s)", type(exc).__name__)
            return conflict
        if verdict is None or not verdict.same:
            return conflict
        recorder = self.journal.recorder if self.journal is not None else None
        if recorder is not None:  # durable before the success is sent, or no success
            recorder.emit(AuditEvent(
                action=f"{'dicom' if source_ae else 'dicomweb'}.store.duplicate",
                outcome=Outcome.SUCCESS, code=EventCode.IMPORT, actor_ae=source_ae,
                actor_address=actor_address, actor_user=actor_user,
                message="the same instance was sent again in another encoding; the first "
                "one was kept",
                detail={"reencoded": True, "stored_syntax": verdict.stored_syntax,
                        "received_syntax": verdict.received_syntax},
                study_uids=(conflict.study_uid,), sop_uids=(conflict.sop_uid,),
                sop_studies={conflict.sop_uid: conflict.study_uid},
            ), required=True)
        return StoreResult(StoreStatus.DUPLICATE, conflict.sop_uid, conflict.study_uid)

    # --- writing --------------------------------------------------------------------

    def _store_once(
        self,
        raw: bytes,
        *,
        source_ae: str = "",
        expected_sop_uid: str | None = None,
        expected_sop_class: str | None = None,
        actor_address: str = "",
        actor_user: str = "",
    ) -> StoreResult:
        """Store a Part 10 byte stream exactly as received.

        Raises ``UnreadableObject``/``InvalidObject`` for bad data and ``DiskFullError``
        when the disk reserve is reached; nothing is written in those cases.
        """
        ds = dicom_parse.read_received(raw)
        staging: Future[str] | None = None
        durable: Future[None] | None = None
        minted: bytes | None = None
        inline: uuid.UUID | None = None  # a small object of a study already cached: its key
        early = dicom_parse.identity(ds)
        if early is not None:
            with self._cache_lock:
                cached = self._study_cache.get(early[1])
                generation = self._generation
            if cached is not None and self._inline(raw):
                inline = cached[1]  # staged below, by this thread (``_INLINE_MAX``)
            elif cached is not None:
                # The study's data key is known: encrypt and write the object in a worker
                # while this thread hashes, validates and describes it; the worker then
                # fsyncs it while this thread writes the rows (``durable``).
                self.objects.check_space(len(raw) + _HEADER_OVERHEAD)
                staging = Future()
                durable = self._workers.submit(self._stage_then_sync, staging, raw,
                                               cached[1], early[0])
        try:
            # Its SHA-256 computed here, beside the staging (hashing lets the worker run).
            parsed = dicom_parse.describe(ds, raw)
            # The dataset holds its own copy of every value (a CR's pixels: ~10 MB): not
            # kept while the object is staged and the group commit waited for (issue 17,
            # peak memory during ingest).
            del ds
            if expected_sop_uid and parsed.sop_uid != expected_sop_uid.strip():
                raise InvalidObject("SOP Instance UID differs from the C-STORE request")
            if expected_sop_class and parsed.sop_class_uid != expected_sop_class.strip():
                raise InvalidObject("SOP Class UID differs from the C-STORE request")
        except BaseException:
            if staging is not None:
                self._abandon(staging)
            raise
        if staging is not None:
            # Written by now, or nearly: its encryption and write ran beside the hash in
            # ``describe`` (issue 17: before, the worker hashed too and this thread waited
            # for all of it). Waited for before the group commit, never inside it: no
            # batch holds the index's write lock on a staging (an S3 PUT, say).
            assert early is not None and cached is not None
            object_id = staging.result()
            key_id = cached[1]
        elif inline is not None:
            self.objects.check_space(len(raw) + _HEADER_OVERHEAD)
            key_id = inline
            object_id, sync = self._stage(raw, key_id, parsed.sop_uid)
            if sync is not None:  # durable before it is queued (a failure: no file left)
                sync()
        else:
            self.objects.check_space(len(raw) + _HEADER_OVERHEAD)
            # A new study of a patient this process has committed rows of: their key, no
            # look-up (issue 17: a pooled connection and a read per one-instance study,
            # ~6 % of the filler's GIL time). As for a cached study, the batch checks the
            # removal generation and whether the instance is known already.
            patient = self._patient_key(parsed)  # (hashed outside the lock)
            with self._cache_lock:
                known_key = self._patient_cache.get(patient)
                seen_at = self._generation
            prepared = ((known_key, seen_at, None) if known_key is not None
                        else self._choose(parsed))
            if isinstance(prepared, StoreResult):
                return prepared
            key_id, generation, minted = prepared
            try:
                if minted is None:
                    object_id, sync = self._stage(raw, key_id, parsed.sop_uid)
                else:  # a new patient's key: no row to read it from yet
                    object_id, sync = self._write(
                        objfmt.encrypt(raw, minted, key_id, parsed.sop_uid))
                if sync is not None and self._inline(raw):
                    sync()  # small: here, not in a worker (``_INLINE_MAX``)
                    sync = None
            except BaseException:
                if minted is not None:  # (as once committed or failed, below)
                    self._minted.release(parsed, key_id)
                raise
            durable = self._workers.submit(sync) if sync is not None else None
        pending = Pending(parsed, object_id, key_id, source_ae, generation,
                           actor_address=actor_address, actor_user=actor_user,
                           new_key=minted, durable=durable)
        try:
            try:
                self._commit(pending)
            finally:
                if minted is not None:
                    self._minted.release(parsed, key_id)
        except IntegrityError:
            # Another process stored the same SOP Instance UID meanwhile.
            self.objects.discard(object_id)
            with self._sessions() as session:
                known = rows.known(session, parsed)
            if known is None:
                raise
            return known
        except BaseException as exc:
            # A failed commit may still have committed (a connection lost during COMMIT on
            # a network database): in a bucket the object is left to the orphan sweep,
            # which deletes it only if no row names it once the grace is over; likewise
            # a local file whose committing worker vanished before answering (the next
            # start's ``recover`` settles it). Other local files (no such doubt) are
            # discarded at once, as always.
            if self.objects.kind != "s3" and not isinstance(exc, CommitOutcomeUnknown):
                self.objects.discard(object_id)
            raise
        if pending.result is not None:  # known already (a re-send, or a race)
            self.objects.discard(object_id)
            return pending.result
        # Durable and indexed: the rename into place is off the response's path (reads
        # find the object staged meanwhile; a crash leaves it to ``recover``). Not in this
        # thread: a rename takes a handle on the file system's journal, which the fsyncs of
        # other processes keep busy (issue 17: tried inline, the CPU it saved was within
        # the loaded machine's noise; one association's latency is what this path is for).
        publishing = self._workers.submit(self.objects.publish, object_id, durable=False)
        with self._cache_lock:
            self._publishing.add(publishing)
        publishing.add_done_callback(self._published)
        return StoreResult(StoreStatus.STORED, parsed.sop_uid, parsed.study_uid)

    def _inline(self, raw: bytes) -> bool:
        """Whether this store stages and fsyncs its object itself (``_INLINE_MAX``): a
        small one while other stores are on their way or committing. Alone (one
        association), its fsync still runs in a worker beside the group commit's rows,
        which it would otherwise precede (its image's latency is the association's
        pace). Read without the lock: a hint."""
        return len(raw) <= _INLINE_MAX and (self._in_flight > 1 or self._committing)

    def _patient_key(self, parsed: ParsedInstance) -> bytes:
        """The patient cache's key: a keyed hash of the patient's ID and issuer (the salt
        is this process's own), so that no patient identifier is kept by the cache."""
        return hashlib.blake2b(
            f"{parsed.patient_id}\x00{parsed.issuer}".encode(), key=self._patient_salt,
            digest_size=16).digest()

    def _published(self, done: Future[None]) -> None:
        with self._cache_lock:
            self._publishing.discard(done)
        if done.exception() is not None:  # stays staged, indexed: recovery publishes it
            log.error("publishing an object failed (%s)", type(done.exception()).__name__)

    def settle(self) -> None:
        """Wait for the publications still running (tests, shutdown)."""
        with self._cache_lock:
            pending = list(self._publishing)
        for future in pending:
            future.exception()

    def _stage(self, raw: bytes, key_id: uuid.UUID, sop_uid: str) -> _Staged:
        """Encrypt and stage an object: (object id, the fsync still to run or None:
        ``_write``). Its SHA-256 is the storing thread's (``describe``), computed while
        this runs in a worker: the object's fsync starts that much sooner (issue 17)."""
        try:
            data_key = self.data_key(key_id)
        except KeyDestroyed:
            # A removal destroyed the patient's key after it was chosen: the choice is
            # stale, and ``store`` chooses again (a new key if the patient is gone).
            raise StaleChoice("the chosen data key was destroyed meanwhile") from None
        return self._write(objfmt.encrypt(raw, data_key, key_id, sop_uid))

    def _stage_then_sync(self, staged: Future[str], raw: bytes, key_id: uuid.UUID,
                         sop_uid: str) -> None:
        """In a worker: ``_stage``, its object id handed over through ``staged`` as soon
        as the object is written, then its fsync (this call's own future)."""
        try:
            object_id, sync = self._stage(raw, key_id, sop_uid)
        except BaseException as exc:
            staged.set_exception(exc)
            raise
        staged.set_result(object_id)
        if sync is not None:
            sync()

    def _write(self, pieces: Iterable[bytes]) -> tuple[str, Callable[[], None] | None]:
        """Write an object into a spare: its id and the fsync that makes it durable, which
        the group commit waits for before committing (local files: ``write_spare``); a
        bucket's PUT is confirmed when it returns (None)."""
        if isinstance(self.objects, ObjectStore):
            return self.objects.write_spare(pieces)
        return self.objects.stage_spare(pieces), None

    def _abandon(self, staging: Future[str]) -> None:
        try:
            object_id = staging.result()
        except BaseException:
            return
        self.objects.discard(object_id)

    def _choose(self, parsed: ParsedInstance) -> StoreResult | _Chosen:
        """First instance of a study seen by this process: either the answer for an
        already stored instance, or the data key to encrypt it under (its study's, its
        patient's, or for a patient first seen one minted here), with the removal
        generation read *before* the rows it was chosen from (so a removal in between is
        noticed). Reads only, on both indexes (``storage.keychoice``; PostgreSQL: one
        statement outside any transaction); a new patient's rows are written by the
        group commit."""
        with self._engine.connect() as conn:
            if not dialect.is_sqlite(conn):  # a read: no BEGIN/COMMIT round trips
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            found = keychoice.look_up(conn, parsed)
        if found.known is not None:
            return found.known
        if found.study is not None:
            with self._cache_lock:
                if self._generation <= found.generation:
                    self._observe(found.generation)
                    self._study_cache[parsed.study_uid] = found.study
            return found.study[1], found.generation, None
        if found.patient_key is not None:
            return found.patient_key, found.generation, None
        key_id, key = self._minted.take(parsed)
        return key_id, found.generation, key

    # --- sealed mode ----------------------------------------------------------------

    def adopt(self, parsed: ParsedInstance, object_id: str, key_id: uuid.UUID,
              data_key: bytes, *, source_ae: str = "", actor_address: str = "",
              actor_user: str = "") -> StoreResult:
        """Index an object received while the archive was sealed (``sealed.merge``): it is
        encrypted and staged or published already, under its own data key (``key_id``,
        given unwrapped), which joins the patient's keys as an ordinary KEK-wrapped key.
        The rows go through the normal group commit (same rows, same store record as
        ``store``). Duplicates are settled as ``store`` would have: identical -> dropped,
        re-encoded -> benign duplicate, anything else -> first kept (``CONFLICT``, the
        caller records the security event). Redone after a crash, an object indexed
        already (same object id) is left as it is."""
        with self._sessions() as session:
            row = session.execute(select(Instance.object_id, Instance.sha256)
                                  .where(Instance.sop_uid == parsed.sop_uid)).first()
        if row is not None:
            if row[0] == object_id:
                self._publish_adopted(object_id)
                return StoreResult(StoreStatus.DUPLICATE, parsed.sop_uid, parsed.study_uid)
            same = secrets.compare_digest(bytes(row[1]), parsed.sha256)
            raw = None if same else objfmt.decrypt(self.objects.read(object_id), data_key,
                                                   parsed.sop_uid)
            self.objects.discard(object_id)
            self.objects.delete(object_id)
            if raw is None:
                return StoreResult(StoreStatus.DUPLICATE, parsed.sop_uid, parsed.study_uid)
            return self._reencoded(
                StoreResult(StoreStatus.CONFLICT, parsed.sop_uid, parsed.study_uid), raw,
                source_ae=source_ae, actor_address=actor_address, actor_user=actor_user)
        with self._write_lock, self._sessions.begin() as session:
            generation = int(session.scalar(text(_GENERATION)) or 0)
            self._keyring.adopt(session, key_id, data_key)
            session.flush()
            if session.scalar(select(Patient.pk).where(
                    Patient.patient_id == parsed.patient_id,
                    Patient.issuer == parsed.issuer)) is None:
                session.add(Patient(
                    patient_id=parsed.patient_id, issuer=parsed.issuer,
                    name=parsed.patient_name, name_norm=normalise_name(parsed.patient_name),
                    birth_date=normalise_date(parsed.birth_date), sex=parsed.sex,
                    key_id=str(key_id), meta_json=parsed.meta_json,
                ))
        pending = Pending(parsed, object_id, key_id, source_ae, generation,
                           actor_address=actor_address, actor_user=actor_user)
        self._commit(pending)
        if pending.result is not None:  # indexed meanwhile by another path
            return pending.result
        self._publish_adopted(object_id)
        return StoreResult(StoreStatus.STORED, parsed.sop_uid, parsed.study_uid)

    def _publish_adopted(self, object_id: str) -> None:
        if self.objects.exists(object_id):
            return
        with contextlib.suppress(FileNotFoundError):  # published by a concurrent path
            self.objects.publish(object_id)

    # --- reading --------------------------------------------------------------------

    def locate(
        self,
        *,
        study_uid: str | None = None,
        patient_id: str | None = None,
        sop_uid: str | None = None,
    ) -> Iterator[StoredInstance]:
        """Instances matching one selector (all of them when none is given), quarantined
        ones included; the query engine's selection (``QueryEngine.stored``)."""
        yield from self._query.stored(study_uid=study_uid, patient_id=patient_id,
                                      sop_uid=sop_uid)

    def data_key(self, key_id: uuid.UUID) -> bytes:
        # A held key without a session: retrieval asks once per object, and opening and
        # closing a session cost more than the rest of the look-up (issue 17).
        key = self._keyring.cached(key_id)
        if key is not None:
            return key
        with self._sessions() as session:
            return self._keyring.get(session, key_id)

    def read(self, item: StoredInstance) -> bytes:
        """Decrypt an instance; raises ``ObjectFormatError`` if its file was tampered with."""
        return objfmt.decrypt(self.objects.read(item.object_id), self.data_key(item.key_id),
                              item.sop_uid)

    def is_indexed(self, object_id: str) -> bool:
        with self._sessions() as session:
            found = session.scalar(select(Instance.pk).where(Instance.object_id == object_id))
        return found is not None

    def indexed(self, object_ids: list[str]) -> set[str]:
        """Which of these object ids an index row names (one query)."""
        if not object_ids:
            return set()
        with self._sessions() as session:
            return set(session.scalars(select(Instance.object_id)
                                       .where(Instance.object_id.in_(object_ids))))

    def recover(self) -> Recovery:
        """Settle object writes interrupted by a crash; run before accepting associations.
        In a bucket there is nothing to settle before: an indexed object is there by
        construction, and the orphans a crash left are deleted by the orphan sweep
        (``storage.scrub.sweep``, serve's job a minute after start): listing a large
        bucket must not delay the start."""
        return self.objects.recover(self.is_indexed)

    def counts(self) -> dict[str, int]:
        """``index.stats.counts`` of this archive's index (one query, two callers)."""
        return stats.counts(self._sessions)
