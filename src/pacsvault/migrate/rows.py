"""Copying the index, table by table, through SQLAlchemy's column types.

Why through the types and not a dump: on PostgreSQL the patient columns are ``Sealed`` /
``Fixed`` (``index.sealing``) and each value must be encrypted by the target engine's
sealer; going back to SQLCipher they must be decrypted. Reading every row with the source
engine and inserting it with the target engine does both, in either direction, with the
same code the archive uses. Blind tokens (``index.blind``) are not copied: they are written
for each new patient, study and series row by ``blind.write``, the function the store path
calls, with the row's normalised values (nothing on an SQLite target).

Primary keys are kept (instances name object ids, studies name patients, tokens name
rows...), so PostgreSQL's sequences are moved past the copied keys at the end. Tables are
copied parents first (``sorted_tables``), then the *side tables* (tables another layer
defines on its own metadata and makes on first use, e.g. the forward queue and its cursor,
``dicom.forward``: handed in by the command line, which may import them), the audit anchor
last. A table the source holds that is none of these (nor the schema's bookkeeping) stops
the migration before anything is copied: a table nobody told the migration about would
otherwise be left behind silently (its rows lost at the switch), or copied without knowing
which of its columns must be sealed. Each chunk is one target transaction; rows already
in the target (a chunk committed just before an interruption, before its progress was
saved) are skipped, so a resumed copy never fails on a duplicate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, insert, inspect, select, text

from pacsvault.index import blind
from pacsvault.index.postgres import OWNER_TABLE
from pacsvault.migrate.state import TableProgress

CHUNK = 500
# Written from their rows, never copied (ON DELETE CASCADE with them; empty on SQLite).
TOKEN_TABLES = frozenset({"patient_tokens", "study_tokens", "series_tokens"})
ANCHOR_TABLE = "audit_head"
# The schema's own bookkeeping: made by each index for itself, never copied (the target's
# version is stamped at creation, its claim names the same vault).
BOOKKEEPING = frozenset({"alembic_version", OWNER_TABLE})

def tables_in_order(tables: Sequence[Table], side: Sequence[Table] = ()) -> list[Table]:
    """The tables to copy: parents first, tokens left out, then the side tables, the
    audit anchor last (it must name the trail's last record when the copy ends)."""
    chosen = [t for t in tables if t.name not in TOKEN_TABLES and t.name != ANCHOR_TABLE]
    return chosen + list(side) + [t for t in tables if t.name == ANCHOR_TABLE]


def present(engine: Engine) -> set[str]:
    """The names of the tables the database holds (its catalog, not a metadata's)."""
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def unknown(engine: Engine, known: Sequence[Table]) -> list[str]:
    """Tables of the database that the migration would not carry (sorted names)."""
    names = {t.name for t in known} | BOOKKEEPING
    return sorted(present(engine) - names)


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def _single_key(table: Table) -> Any | None:
    keys = list(table.primary_key.columns)
    if len(keys) == 1 and keys[0].type.python_type in (int, str):
        return keys[0]
    return None


def copy_table(source: Engine, target: Engine, table: Table, progress: TableProgress,
               saved: Callable[[int], None]) -> None:
    """Copy one table from where ``progress`` stopped; ``saved(rows)`` after each chunk
    committed (the caller writes the state file)."""
    key = _single_key(table)
    if key is None:  # composite or binary keys: small tables, copied whole in one go
        with source.connect() as conn:
            rows = [_utc(dict(r._mapping)) for r in conn.execute(select(table))]
        with target.begin() as out:
            out.execute(table.delete())
            if rows:
                out.execute(insert(table), rows)
        progress.copied = len(rows)
        saved(len(rows))
        return
    while True:
        query = select(table).order_by(key).limit(CHUNK)
        if progress.last is not None:
            query = query.where(key > progress.last)
        with source.connect() as conn:
            rows = [_utc(dict(r._mapping)) for r in conn.execute(query)]
        if not rows:
            return
        with target.begin() as out:
            present = set(out.scalars(select(table.c[key.name]).where(
                table.c[key.name].in_([r[key.name] for r in rows]))))
            fresh = [r for r in rows if r[key.name] not in present]
            if fresh:
                out.execute(insert(table), fresh)
                _write_tokens(out, table.name, fresh)
        progress.last = rows[-1][key.name]
        progress.copied += len(rows)
        saved(len(rows))


def _utc(row: dict[str, Any]) -> dict[str, Any]:
    """Times as aware UTC: SQLite hands back naive UTC values, PostgreSQL aware ones in
    the session's zone; both indexes hold UTC (``models.utcnow``)."""
    for name, value in row.items():
        if isinstance(value, dt.datetime):
            aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
            row[name] = aware.astimezone(dt.UTC)
    return row


def _write_tokens(conn: Connection, name: str, rows: list[dict[str, Any]]) -> None:
    spec = blind.TOKENED_TABLES.get(name)  # the rows' normalised values by keyword
    if spec is None:
        return
    level, columns = spec
    for row in rows:
        blind.write(conn, level, int(row["pk"]),
                    {keyword: str(row[column] or "") for keyword, column in columns})


def replace_anchor(source: Engine, target: Engine, anchor: Table) -> None:
    """The trail's anchor as the source holds it now (it moves with the trail)."""
    with source.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(anchor))]
    with target.begin() as out:
        out.execute(anchor.delete())
        if rows:
            out.execute(insert(anchor), rows)


def reset_sequences(target: Engine, tables: Sequence[Table]) -> None:
    """PostgreSQL: each serial key's sequence continues after the copied keys (inserts
    with explicit keys do not move it); nothing to do on SQLite."""
    if target.dialect.name != "postgresql":
        return
    with target.begin() as conn:
        for table in tables:
            key = _single_key(table)
            if key is None or key.type.python_type is not int:
                continue
            name = target.dialect.identifier_preparer.quote(table.name)
            column = target.dialect.identifier_preparer.quote(key.name)
            conn.execute(text(
                f"SELECT setval(pg_get_serial_sequence(:tbl, :col), "  # noqa: S608
                f"COALESCE(MAX({column}), 1), MAX({column}) IS NOT NULL) FROM {name}"),
                {"tbl": name, "col": key.name})
