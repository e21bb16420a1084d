"""Which version of the index layout a vault has, and bringing it to this code's (issue 15).

Alembic, driven in code (no ``alembic.ini``: the script directory is ``index/migrations``
inside the package, the connection is the vault's open engine with its SQLCipher key), so
the same revisions will serve PostgreSQL in the scale-out issue. The revision lives in the
index's ``alembic_version`` table; ``vault.json``'s ``layout`` says the vault format as a
whole (``LAYOUT``).

A vault without ``alembic_version`` was made before versions existed: the old idempotent
``ensure_*`` upgrades (``legacy_baseline``: columns added by ``ALTER TABLE``, tables that
came later) bring it to the baseline, which is then stamped, and the revisions after it
run. All of this happens at open, under the single-instance lock ``serve`` holds, never in
a request path. The write lock is taken first (``BEGIN IMMEDIATE``; on PostgreSQL the
index's advisory lock, ``index.dialect``), so two commands or instances opening an old
index at the same moment upgrade it once. A PostgreSQL index (issue 16) is laid out by the
same revisions from an empty database at ``init``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, Table, inspect
from sqlalchemy.exc import OperationalError

from pacsvault.index import dialect

if TYPE_CHECKING:  # alembic is imported only when there is something to do: every
    from alembic.config import Config  # command opens the vault, few upgrade it

BASELINE = "0001"
# The newest revision in ``migrations/versions`` (a test checks they agree): an index at
# HEAD is recognised with one query, without importing alembic.
HEAD = "0008"
# vault.json "layout": 1 = before schema versions (no such key), 2 = versioned index.
LAYOUT = 2
_SCRIPTS = Path(__file__).resolve().parent / "migrations"


class SchemaTooNew(Exception):
    """The index was upgraded by a newer pacsvault (message is user-facing)."""


@dataclass(frozen=True)
class Plan:
    """An upgrade to do: from ``current`` (None: before versions) to ``head``."""

    current: str | None
    head: str

    def describe(self) -> str:
        return (f"upgrading the index from revision {self.current or 'none (pre-versioned)'}"
                f" to {self.head}; back it up first with 'pacsvault backup run'")


def _config(conn: Connection | None = None,
            tables: Sequence[Table] = ()) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_SCRIPTS))
    cfg.attributes["connection"] = conn
    cfg.attributes["tables"] = list(tables)
    return cfg


def head() -> str:
    """The newest revision of the scripts (``HEAD`` says it without reading them)."""
    from alembic.script import ScriptDirectory

    found = ScriptDirectory.from_config(_config()).get_current_head()
    assert found is not None
    return found


def current(conn: Connection) -> str | None:
    """The index's revision, None before versions (no ``alembic_version`` table)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    value = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    return None if value is None else str(value)


def plan(engine: Engine) -> Plan | None:
    """What an upgrade would do, None when the index is at this code's head. Raises
    ``SchemaTooNew`` for a revision this code does not know (a newer pacsvault's)."""
    with engine.connect() as conn:
        rev = current(conn)
    if rev == HEAD:
        return None
    top = head()
    if rev is not None:
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError

        try:
            found = ScriptDirectory.from_config(_config()).get_revision(rev)
        except CommandError:
            found = None
        if found is None:
            raise SchemaTooNew(
                f"the index is at revision {rev}, which this pacsvault does not know: this "
                "vault was upgraded by a newer pacsvault; install it") from None
    return Plan(rev, top)


def legacy_baseline(engine: Engine, tables: Sequence[Table]) -> None:
    """The upgrades of vaults made before schema versions, as they ran at every open
    (idempotent, harmless if another process does them at the same moment): the columns
    added since (``instances.quarantined`` and its index, ``nodes.tls_profile``), then
    every table of ``tables`` that is missing (``object_actions``, ``node_certificates``,
    sign-in counters, known devices, preferences, erasure requests)."""
    from pacsvault.index import db, nodes

    db.upgrade(engine)
    nodes.ensure_tables(engine)
    for table in tables:
        with contextlib.suppress(OperationalError):  # made by another process meanwhile
            table.create(engine, checkfirst=True)


def upgrade(engine: Engine, tables: Sequence[Table]) -> Plan | None:
    """Bring the index to this code's head; returns what was done (None: nothing).
    ``tables``: every table of the layout (their model modules imported)."""
    todo = plan(engine)
    if todo is None:
        return None
    from alembic import command

    # Only an embedded index can predate versions; a PostgreSQL index without
    # ``alembic_version`` is a new, empty one, which the baseline revision lays out.
    legacy = dialect.is_sqlite(engine)
    if todo.current is None and legacy:
        legacy_baseline(engine, tables)
    with engine.begin() as conn:
        dialect.take_write_lock(conn)  # one upgrader at a time (every instance)
        rev = current(conn)  # another process may have done it meanwhile
        cfg = _config(conn, tables)
        if rev is None and legacy:
            command.stamp(cfg, BASELINE)
        if current(conn) != todo.head:
            command.upgrade(cfg, "head")
    return todo


def stamp_head(engine: Engine) -> None:
    """A new index (every table just made from the models) is at the head."""
    from alembic import command

    with engine.begin() as conn:
        command.stamp(_config(conn), "head")
