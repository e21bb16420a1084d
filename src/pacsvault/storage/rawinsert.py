"""A table's INSERT sent straight to the DB-API driver, values bound as SQLAlchemy binds them.

Why (issue 17, the one-instance-study "filler" row): a store of a new study inserts its
patient, data key, study and series rows; through SQLAlchemy Core each insert cost more
CPU (statement cache look-up, parameter processing, result proxy, primary key fetch) than
SQLite's own work. Here the SQL text, the columns' bind processors and their Python
defaults are prepared once per table and dialect, and each insert is one
``cursor.execute``: the same values reach the database as through
``conn.execute(insert(table), values)`` (``tests/test_store_rows_sqlite.py`` compares the
rows of both). Used on the embedded index only (SQLite); on PostgreSQL the rows go through
``storage.pgrows``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import Connection, Integer, Table
from sqlalchemy.engine.interfaces import Dialect

# (column name, bind processor, scalar default, callable default)
_Column = tuple[str, Callable[[Any], Any] | None, Any, Callable[[Any], Any] | None]


class RawInsert:
    """``INSERT INTO table`` (every column but an integer primary key) for one dialect."""

    def __init__(self, table: Table) -> None:
        self._table = table
        self._prepared: dict[str, tuple[str, list[_Column]]] = {}

    def _prepare(self, dialect: Dialect) -> tuple[str, list[_Column]]:
        columns: list[_Column] = []
        for column in self._table.c:
            if column.primary_key and isinstance(column.type, Integer):
                continue  # the rowid: assigned by SQLite, read back as ``lastrowid``
            if column.server_default is not None:
                raise TypeError(f"{column} has a server default: not supported here")
            default = column.default
            value: Any = None
            make: Callable[[Any], Any] | None = None
            if default is not None and default.is_callable:
                make = default.arg  # type: ignore[attr-defined]  # SQLAlchemy's wrapper
            elif default is not None and default.is_scalar:
                value = default.arg  # type: ignore[attr-defined]
            elif default is not None:
                raise TypeError(f"{column} has a default of another kind")
            # as SQLAlchemy binds: the dialect's implementation of the type (a TypeDecorator
            # such as ``SealedTime`` picks its own per dialect)
            process = cast(Callable[[Any], Any] | None,
                           column.type.dialect_impl(dialect).bind_processor(dialect))
            columns.append((column.name, process, value, make))
        quote = dialect.identifier_preparer.quote
        names = ", ".join(quote(column[0]) for column in columns)
        marks = ", ".join("?" for _ in columns)
        sql = f"INSERT INTO {quote(self._table.name)} ({names}) VALUES ({marks})"  # noqa: S608
        prepared = self._prepared[dialect.name] = (sql, columns)
        return prepared

    def run(self, conn: Connection, values: dict[str, Any]) -> int:
        """Insert one row in ``conn``'s transaction; its integer primary key (rowid)."""
        prepared = self._prepared.get(conn.dialect.name) or self._prepare(conn.dialect)
        sql, columns = prepared
        params = []
        for name, process, default, make in columns:
            if name in values:
                value = values[name]
            elif make is not None:
                value = make(None)  # a callable column default (``utcnow``; no context)
            else:
                value = default
            params.append(process(value) if process is not None else value)
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql, params)
            row_id = cursor.lastrowid
        finally:
            cursor.close()
        return int(row_id or 0)
