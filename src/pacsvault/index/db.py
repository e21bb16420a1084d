"""Opening the encrypted index.

The SQLCipher key is a raw 256-bit key derived from the master key (``x'..'`` syntax), so
opening the database costs no password stretching and a wrong master key fails at once.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import sqlcipher3
from sqlalchemy import Engine, Table, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DatabaseError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from pacsvault.index.models import Base, ObjectAction

INDEX_NAME = "index.db"


class IndexOpenError(Exception):
    """The index cannot be opened with this key (message is user-facing)."""


# How long a statement waits for another connection's write lock (``_on_connect``).
BUSY_TIMEOUT_MS = 30000


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL + synchronous=FULL: a commit is on disk when it returns, readers never block the
    # writer, and a killed process leaves a database SQLite recovers on next open.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # Keep SQLite's own temporary files in memory: they would be unencrypted on disk.
    cur.execute("PRAGMA temp_store=MEMORY")
    # DICOM matching is case-sensitive (person names use a case-folded column instead);
    # this also lets prefix LIKE use the indexes.
    cur.execute("PRAGMA case_sensitive_like=ON")
    cur.close()


def open_index(path: Path, key: bytes, *, create: bool = False) -> Engine:
    if not create and not path.exists():
        raise IndexOpenError(f"index database missing: {path}")
    # The plain SQLite dialect on SQLCipher's module: the key is given by ``IndexGate`` as
    # each connection opens (pysqlcipher's dialect would fix it for the engine's life).
    engine = create_engine(
        URL.create("sqlite+pysqlite", database=str(path)),
        module=sqlcipher3,
        poolclass=QueuePool,
        pool_size=8,
        max_overflow=8,
        # The connection returned last is taken next: SQLCipher decrypts and checks (HMAC)
        # every page a connection reads into its own cache, and a commit by another
        # connection empties that cache. First-in-first-out handed each store the
        # connection idle longest, cold since the last commit; the last one back is most
        # often the group commit's own, still warm (issue 17: one-instance studies, 28 ->
        # 9 page decryptions per image, probes on sqlcipher_page_cipher).
        pool_use_lifo=True,
        connect_args={"check_same_thread": False},
    )
    gate = IndexGate(key)
    _GATES[engine] = gate
    event.listen(engine, "do_connect",
                 lambda _dialect, record, cargs, cparams: gate.connect(record, cargs, cparams))
    event.listen(engine, "connect", _on_connect)
    event.listen(engine.pool, "checkout", lambda _conn, record, _proxy: gate.checkout(record))
    event.listen(engine.pool, "checkin", lambda _conn, record: gate.checkin(record))
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT count(*) FROM sqlite_master"))
        if create:
            Base.metadata.create_all(engine)
        # an existing index is brought up to date by ``index.schema`` (``Vault.open``)
    except DatabaseError:
        engine.dispose()
        raise IndexOpenError(
            "the index database does not open with this key (wrong key file?)"
        ) from None
    return engine


class IndexGate:
    """The index engine's current key, and a gate the master key rotation closes while it
    re-keys the file.

    After ``PRAGMA rekey`` commits, a connection opened with the old key reads garbage
    ("file is not a database"): a C-FIND or an association check that happened to hold one
    would fail. So connections carry the key generation they were opened with; the
    rotation closes the gate (new checkouts wait; a thread already holding a connection
    may take another, so nobody deadlocks on their own), waits for the ones out to come
    back, re-keys, and bumps the generation: every pooled connection of the old
    generation is reopened with the new key at its next checkout. One engine serves the
    vault for its whole life, so nothing that holds it needs telling.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._generation = 0
        self._cond = threading.Condition()
        self._holders: dict[int, int] = {}
        self._closer: int | None = None

    def connect(self, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        with self._cond:
            key, generation = self._key, self._generation
        conn = sqlcipher3.connect(*cargs, **cparams)
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        record.info["pv_generation"] = generation
        return conn

    def checkout(self, record: Any) -> None:
        me = threading.get_ident()
        with self._cond:
            while self._closer not in (None, me) and not self._holders.get(me):
                self._cond.wait()
            if record.info.get("pv_generation") != self._generation:
                # the pool invalidates this connection and opens it again (new key)
                raise DisconnectionError("the index was re-keyed")
            self._holders[me] = self._holders.get(me, 0) + 1
            record.info["pv_holder"] = me

    def checkin(self, record: Any) -> None:
        who = record.info.pop("pv_holder", None) if record is not None else None
        if who is None:
            return
        with self._cond:
            left = self._holders.get(who, 0) - 1
            if left > 0:
                self._holders[who] = left
            else:
                self._holders.pop(who, None)
            self._cond.notify_all()

    @contextlib.contextmanager
    def closed(self, timeout: float) -> Iterator[bool]:
        """Hold new checkouts and wait (up to ``timeout``) until no other thread holds a
        connection; yields whether that happened (False: someone kept one, most likely
        waiting on a lock the caller holds; they will meet the old key once)."""
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._closer is None)
            self._closer = me
            drained = self._cond.wait_for(
                lambda: all(who == me for who in self._holders), timeout)
        try:
            yield drained
        finally:
            with self._cond:
                self._closer = None
                self._cond.notify_all()

    def set_key(self, key: bytes) -> None:
        with self._cond:
            if key != self._key:
                self._key = key
                self._generation += 1


_GATES: weakref.WeakKeyDictionary[Engine, IndexGate] = weakref.WeakKeyDictionary()


def gate_of(engine: Engine) -> IndexGate:
    return _GATES[engine]


def rekey_underway(engine: Engine) -> bool:
    """Whether ``engine``'s key gate is closed (or closing) for a re-key: a new checkout
    would wait until it ends. Read without the gate's lock (a hint for a caller that must
    not wait, ``rawselect.read_would_wait``)."""
    gate = _GATES.get(engine)
    return gate is not None and gate._closer is not None


def rekey(engine: Engine, old_key: bytes, new_key: bytes, *,
          drain_timeout: float = 5.0) -> bool:
    """Re-key the index file behind ``engine`` (every page rewritten under ``new_key`` in one
    transaction, the WAL truncated so no old-key page stays in it) with the gate closed;
    ``engine`` goes on with the new key. Returns whether every connection was back."""
    gate = gate_of(engine)
    database = engine.url.database
    assert database
    with gate.closed(drain_timeout) as drained:
        conn = sqlcipher3.connect(database, timeout=60, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA key = \"x'{old_key.hex()}'\"")
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            conn.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()
        gate.set_key(new_key)
    return drained


def opens_with(path: Path, key: bytes) -> bool:
    """Whether the index file opens with ``key`` (a probe, no engine)."""
    conn = sqlcipher3.connect(str(path), check_same_thread=False)
    try:
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return True
    except sqlcipher3.DatabaseError:
        return False
    finally:
        conn.close()


def upgrade(engine: Engine) -> None:
    """Give a vault made by an older version what the index gained since (one of the
    pre-versioned upgrades ``index.schema.legacy_baseline`` runs): the
    ``instances.quarantined`` column (``ALTER TABLE ADD COLUMN``, with its partial index)
    and the ``object_actions`` table. Idempotent, and harmless when another process (the
    server, a command) does it at the same moment."""
    with engine.begin() as conn:
        columns = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(instances)")}
        if columns and "quarantined" not in columns:
            # "duplicate column": another process was quicker
            with contextlib.suppress(OperationalError):
                conn.exec_driver_sql("ALTER TABLE instances ADD COLUMN quarantined DATETIME")
        if columns:
            conn.exec_driver_sql(
                "CREATE INDEX IF NOT EXISTS ix_instances_quarantined ON instances "
                "(quarantined) WHERE quarantined IS NOT NULL")
    with contextlib.suppress(OperationalError):  # created by another process meanwhile
        cast(Table, ObjectAction.__table__).create(engine, checkfirst=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
