"""Opening the encrypted index.

The SQLCipher key is a raw 256-bit key derived from the master key (``x'..'`` syntax), so
opening the database costs no password stretching and a wrong master key fails at once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, cast

import sqlcipher3
from sqlalchemy import Engine, Table, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from pacsvault.index.models import Base, ObjectAction

INDEX_NAME = "index.db"


class IndexOpenError(Exception):
    """The index cannot be opened with this key (message is user-facing)."""


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL + synchronous=FULL: a commit is on disk when it returns, readers never block the
    # writer, and a killed process leaves a database SQLite recovers on next open.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    # Keep SQLite's own temporary files in memory: they would be unencrypted on disk.
    cur.execute("PRAGMA temp_store=MEMORY")
    # DICOM matching is case-sensitive (person names use a case-folded column instead);
    # this also lets prefix LIKE use the indexes.
    cur.execute("PRAGMA case_sensitive_like=ON")
    cur.close()


def open_index(path: Path, key: bytes, *, create: bool = False) -> Engine:
    if not create and not path.exists():
        raise IndexOpenError(f"index database missing: {path}")
    url = URL.create("sqlite+pysqlcipher", password=f"x'{key.hex()}'", database=str(path))
    engine = create_engine(
        url,
        module=sqlcipher3,
        poolclass=QueuePool,
        pool_size=8,
        max_overflow=8,
        connect_args={"check_same_thread": False},
    )
    event.listen(engine, "connect", _on_connect)
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
