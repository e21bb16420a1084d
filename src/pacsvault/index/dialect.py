"""What differs between the embedded index (SQLCipher) and PostgreSQL, in one place.

Why: a handful of statements are SQLite's own (``BEGIN IMMEDIATE`` to take the write
lock first, ``PRAGMA secure_delete``, a WAL checkpoint). The workflows that need them
(the archive's group commit, removals, erasure, schema upgrades) call these helpers, which
do the equivalent on PostgreSQL or nothing where nothing is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

# pg_advisory_xact_lock key of the index's single writer lock ("pvwl"): every process
# that would have taken SQLite's write lock takes this one, for its transaction.
WRITE_LOCK_KEY = 0x7076776C


def is_sqlite(bind: Connection | Engine) -> bool:
    return bind.dialect.name == "sqlite"


def take_write_lock(conn: Connection) -> None:
    """Take the index's write lock for the rest of ``conn``'s transaction, before anything
    is read: on SQLite ``BEGIN IMMEDIATE`` (the transaction must not have begun in
    SQLite yet); on PostgreSQL a transaction-level advisory lock, released by the commit
    or rollback. In both, a writer holding it sees every commit made before it got it
    (PostgreSQL's read committed takes a new snapshot per statement)."""
    if is_sqlite(conn):
        _begin_immediate(conn)
    else:  # once per store batch: without SQLAlchemy's execution machinery
        run_driver(conn, _WRITE_LOCK)


_WRITE_LOCK = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"
_BEGIN_IMMEDIATE = "BEGIN IMMEDIATE"


def _begin_immediate(conn: Connection) -> None:
    """``BEGIN IMMEDIATE`` on ``conn``'s DBAPI connection, without SQLAlchemy's execution
    context (issue 17: once per store batch, ~30 us of its ~95 us through
    ``exec_driver_sql``); the driver's errors raised as ``exec_driver_sql`` raises them
    (``OperationalError`` for a lock not taken within the busy timeout)."""
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.cursor()
    try:
        cursor.execute(_BEGIN_IMMEDIATE)
    except dbapi.Error as exc:
        raise DBAPIError.instance(_BEGIN_IMMEDIATE, None, exc, dbapi.Error,
                                  hide_parameters=True, dialect=conn.dialect) from exc
    finally:
        cursor.close()


def run_driver(conn: Connection, sql: str,
               params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one PostgreSQL statement on ``conn``'s DBAPI connection (in its transaction,
    if any) and return its rows ([] when it returns none), psycopg's errors raised as
    SQLAlchemy's (``DBAPIError.instance``: the same classes ``exec_driver_sql`` raises,
    parameters hidden). For statements on the per-image path, where SQLAlchemy's
    execution context and result objects cost more than the statement (issue 16,
    scale-out ingest); bound values of sealed columns must be bound by the caller
    (``storage.pgrows``)."""
    import psycopg

    cursor: Any = None
    try:
        cursor = conn.connection.cursor()
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, None, exc, psycopg.Error, hide_parameters=True,
                                  dialect=conn.dialect) from exc
    finally:
        if cursor is not None:
            cursor.close()


def secure_delete(conn: Connection, on: bool) -> None:
    """SQLite: freed pages are zeroed (erasure). PostgreSQL has no such switch: deleted
    rows stay in the table file until VACUUM reclaims the space; they were ciphertext
    (``index.sealing``) under keys only the master key derives."""
    if is_sqlite(conn):
        conn.exec_driver_sql(f"PRAGMA secure_delete={'ON' if on else 'OFF'}")


def checkpoint(conn: Connection) -> None:
    """SQLite: move the WAL's pages into the database file and truncate it (no old page
    left in the WAL). Nothing to do on PostgreSQL."""
    if is_sqlite(conn):
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
