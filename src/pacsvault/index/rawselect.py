"""A fixed SELECT of one row, read straight through the SQLite driver (issue 17).

Why: a few reads run once per request or association before anything else can happen
(the bearer token's row, the calling node's row). Through SQLAlchemy Core each cost more
CPU (statement cache look-up, parameter processing, result proxy) than SQLite's indexed
read itself, and on a loaded machine every one of those calls runs cold. Here the SQL
text and each column's result processor are prepared once per dialect, and a read is one
``execute`` on the driver's connection: the values are converted by the columns' own
result processors, as SQLAlchemy would (the tests compare both). The engine's pool,
events and key gate are used as before (``engine.connect``). On any other database the
statement goes through Core unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy import Engine, Select
from sqlalchemy.engine.interfaces import Dialect

Processor = Callable[[Any], Any] | None


class RawSelect:
    """``statement`` (a Core SELECT with named ``bindparam``s) read as a tuple of values."""

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self.names = tuple(statement.selected_columns.keys())
        self._prepared: dict[str, tuple[str, tuple[str, ...], list[Processor]]] = {}

    def _prepare(self, dialect: Dialect) -> tuple[str, tuple[str, ...], list[Processor]]:
        found = self._prepared.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            # positional parameters in their order in the SQL text (SQLite: qmark)
            order = tuple(compiled.positiontup or ())
            processors = [cast(Processor, column.type.dialect_impl(dialect)
                               .result_processor(dialect, None))
                          for column in self.statement.selected_columns]
            found = self._prepared[dialect.name] = (str(compiled), order, processors)
        return found

    def first(self, engine: Engine, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row's values (None: no row), converted as SQLAlchemy converts them."""
        with engine.connect() as conn:
            dialect = conn.dialect
            if dialect.name != "sqlite":
                row = conn.execute(self.statement, dict(params)).first()
                return None if row is None else tuple(row)
            sql, order, processors = self._prepare(dialect)
            raw: Any = conn.connection.driver_connection
            values = raw.execute(sql, tuple(params[name] for name in order)).fetchone()
        if values is None:
            return None
        return tuple(value if process is None or value is None else process(value)
                     for process, value in zip(processors, values, strict=True))


def read_would_wait(engine: Engine) -> bool:
    """Whether a read through ``engine`` could wait right now: its key gate is closed for
    a re-key (``db.IndexGate``: new checkouts wait until it ends), or its pool has no idle
    connection (the next checkout may wait for one). A read made on an event loop is then
    handed to a worker thread instead (issue 17, ``deps.quick_principal``): waiting on the
    loop would stall every connection, including the streams whose connections the re-key
    or the pool waits for. Read without locks: a change just after is waited for as
    anywhere else."""
    from pacsvault.index import db

    if db.rekey_underway(engine):
        return True
    idle = getattr(engine.pool, "checkedin", None)
    return idle is not None and idle() == 0
