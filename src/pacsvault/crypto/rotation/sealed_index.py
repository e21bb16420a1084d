"""The index step of a master key rotation on a PostgreSQL index (issue 16).

Why not one statement: SQLCipher re-keys the embedded file with ``PRAGMA rekey``;
PostgreSQL holds no key at all, the columns do (``index.sealing``: ``Sealed``, ``Fixed``
and ``SealedTime`` under three keys derived from the master key, blind tokens under a
fourth). So every encrypted value of every table is opened with the old keys and written
again under the new ones, and every tokened row (patients, studies, series) gets its
tokens again under the new token key (``blind.rewrite``), in the same transaction as the
row: a row and its tokens are never under two keys.

Resumable: rows are taken in key order, ``CHUNK`` per transaction. Which key a value is
under is told by authentication (AES-GCM / AES-SIV), the new key first
(``sealing.reseal``): a value that opens with the new keys is done, one that opens with
the old is moved, one that opens with neither stops the rotation (nothing guessed). A
crash between two chunks leaves committed rows under the new keys and the others under
the old; the next run (``Vault.open`` finding the marker) skips the first and moves the
rest. The owner row (``index.postgres``) is moved last: once it opens with the new keys
the whole index does, and ``Vault.open`` opens the engine with whichever sealer it names.

While the step runs, the engine's sealer binds with the old keys and opens with either
(``Sealer.reading_also``); online, other threads' checkouts wait (``readers_held``) so no
query binds a ``Fixed`` value under one key while the row is under the other. At the end
the engine gets the new keys alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Engine,
    LargeBinary,
    Table,
    bindparam,
    event,
    inspect,
    select,
    type_coerce,
    update,
)

from pacsvault.index import blind, postgres
from pacsvault.index.models import Base, SealedTime
from pacsvault.index.sealing import Fixed, Sealed, SealedColumnError, Sealer, attach, reseal

log = logging.getLogger("pacsvault.rotation")

CHUNK = 256


class SealedIndexError(Exception):
    """A value opens with neither key (message names table and column, never a value)."""


@dataclass(frozen=True)
class EncryptedColumn:
    name: str
    label: str
    fixed: bool


def tables() -> list[Table]:
    """Every table of the index layout (share links and erasure requests register theirs
    when imported, as ``vaultindex.layout_tables`` does)."""
    import pacsvault.sharing.links
    import pacsvault.storage.erasure_requests  # noqa: F401

    return list(Base.metadata.sorted_tables)


def encrypted_columns(table: Table) -> list[EncryptedColumn]:
    """The columns of ``table`` whose values are sealed with a master-derived key."""
    found: list[EncryptedColumn] = []
    for column in table.columns:
        kind = column.type
        if isinstance(kind, Sealed | Fixed | SealedTime):
            found.append(EncryptedColumn(column.name, kind.label, isinstance(kind, Fixed)))
    return found


def other_instances(engine: Engine, this: str) -> list[str]:
    """The instances other than ``this`` anchored in the index (``instances add`` reserves
    a name there): each holds its own copy of the master key file."""
    from pacsvault.audit.instances import heads

    return sorted(name for name in heads(engine) if name != this)


def _single_key(table: Table) -> Any:
    keys = list(table.primary_key.columns)
    if len(keys) != 1:
        raise SealedIndexError(f"table {table.name}: no single primary key to walk")
    return keys[0]


def reseal_index(engine: Engine, old: Sealer, new: Sealer, vault_id: str, *,
                 limit: int | None = None,
                 chunk_done: Callable[[int], None] | None = None) -> int:
    """Move every encrypted value and token of the index from ``old``'s keys to
    ``new``'s; returns how many rows changed. ``limit`` (tests): chunks of at most that
    many rows; ``chunk_done(rows so far)`` after each commit (the crash hook)."""
    with engine.connect() as conn:
        if postgres.owner_sealed_with(conn, new, vault_id):
            attach(engine, new)
            return 0  # an interrupted run finished the index already
    attach(engine, old.reading_also(new))
    size = min(CHUNK, limit) if limit else CHUNK
    moved = 0
    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
    for table in tables():
        columns = encrypted_columns(table)
        if columns and table.name in present:  # (a table a later upgrade adds: none yet)
            moved = _reseal_table(engine, table, columns, old, new, size, moved, chunk_done)
    with engine.begin() as conn:
        postgres.reseal_owner(conn, new, vault_id)
    attach(engine, new)
    return moved


def _reseal_table(engine: Engine, table: Table, columns: list[EncryptedColumn], old: Sealer,
                  new: Sealer, size: int, moved: int,
                  chunk_done: Callable[[int], None] | None) -> int:
    key = _single_key(table)
    raw = [type_coerce(table.c[c.name], LargeBinary).label(c.name) for c in columns]
    change = (update(table).where(key == bindparam("k_key"))
              .values({c.name: bindparam(f"v_{c.name}", type_=LargeBinary) for c in columns}))
    tokened = blind.TOKENED_TABLES.get(table.name)
    last: Any = None
    while True:
        query = select(key.label("k_key"), *raw).order_by(key).limit(size)
        if last is not None:
            query = query.where(key > last)
        with engine.begin() as conn:
            rows = conn.execute(query).all()
            if not rows:
                return moved
            last = rows[-1][0]
            updates: list[dict[str, Any]] = []
            tokens: list[tuple[int, dict[str, str]]] = []
            for row in rows:
                params, values = _reseal_row(table.name, columns, row, old, new)
                if params is None:
                    continue
                updates.append({"k_key": row[0], **params})
                if tokened is not None:
                    tokens.append((int(row[0]), {keyword: values.get(column, "")
                                                 for keyword, column in tokened[1]}))
            if updates:
                conn.execute(change, updates)
                if tokened is not None:
                    blind.rewrite(conn, new, tokened[0], tokens)
        if updates:
            moved += len(updates)
            if chunk_done is not None:
                chunk_done(moved)


def _reseal_row(table: str, columns: list[EncryptedColumn], row: Any, old: Sealer,
                new: Sealer) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The row's new blobs (None: all under the new keys already) and its values."""
    params: dict[str, Any] = {}
    values: dict[str, str] = {}
    changed = False
    for column, blob in zip(columns, row[1:], strict=True):
        if blob is None:
            params[f"v_{column.name}"] = None
            continue
        try:
            fresh, value = reseal(old, new, column.label, bytes(blob), fixed=column.fixed)
        except SealedColumnError:
            raise SealedIndexError(
                f"{table}.{column.name}: a value opens with neither the old nor the new "
                "key; nothing more was changed") from None
        values[column.name] = value
        params[f"v_{column.name}"] = bytes(blob) if fresh is None else fresh
        changed = changed or fresh is not None
    return (params if changed else None), values


@contextlib.contextmanager
def readers_held(engine: Engine, timeout: float = 5.0) -> Iterator[bool]:
    """Other threads' new checkouts wait while the index moves to the new keys (online):
    a query binding a ``Fixed`` value under one key while the row is under the other
    would miss it. Waits up to ``timeout`` for connections out to come back; yields
    whether they did (one that did not reads either key, as the engine's sealer does,
    and may miss a row once). The calling thread keeps its checkouts."""
    me = threading.get_ident()
    cond = threading.Condition()
    opened = False

    def checkout(_dbapi: Any, _record: Any, _proxy: Any) -> None:
        if threading.get_ident() == me:
            return
        with cond:
            cond.wait_for(lambda: opened)

    event.listen(engine, "checkout", checkout)
    try:
        out = getattr(engine.pool, "checkedout", lambda: 0)
        deadline = time.monotonic() + timeout
        while out() > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield out() == 0
    finally:
        with cond:
            opened = True
            cond.notify_all()
        event.remove(engine, "checkout", checkout)

