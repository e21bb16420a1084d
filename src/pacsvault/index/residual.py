"""How one query condition is answered on a sealed index (PostgreSQL, ``index.sealing``):
what SQL can still decide, what blind tokens narrow, what pacsvault checks itself.

Why apart from the engine (``index.query``): the embedded index hands every condition to
SQL (``Condition.clause``); a sealed one cannot compare ``Sealed`` columns at all and
``Fixed`` ones only for equality. Each condition is split here into

- SQL, when it is exact there: ``=``/``IN`` on a ``Fixed`` column (the bound value is
  encrypted the same way), anything on a plain column, integers, ``never``;
- a token prefilter (``index.blind``) when the attribute has tokens: a necessary
  condition only, so the condition is also
- a *residual*: ``Condition.matches_stored`` on the decrypted column value, the same
  semantics as the SQL clause, so the answers are the embedded index's.

Nothing here ever puts ``LIKE`` or a range on an encrypted column: it would compare
ciphertexts and silently answer wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, any_, false, func, select, text
from sqlalchemy.orm import InstrumentedAttribute, Session

from pacsvault.index import blind
from pacsvault.index.headers import meta_matches
from pacsvault.index.levels import Level
from pacsvault.index.matching import Condition
from pacsvault.index.models import Instance, Patient, Series, Study
from pacsvault.index.sealing import Fixed, Sealed, Sealer

ENTITIES: dict[Level, Any] = {Level.PATIENT: Patient, Level.STUDY: Study,
                              Level.SERIES: Series, Level.IMAGE: Instance}


@dataclass(frozen=True)
class Residual:
    """A condition checked on the decrypted value of ``column`` (a column of the
    record's level or of a level above, joined in the query)."""

    column: InstrumentedAttribute[Any]
    cond: Condition


def protection(column: InstrumentedAttribute[Any]) -> str:
    """"sealed", "fixed" or "plain": what the column's type lets SQL do with it."""
    kind = column.type
    if isinstance(kind, Sealed):
        return "sealed"
    if isinstance(kind, Fixed):
        return "fixed"
    return "plain"


def in_sql(column: InstrumentedAttribute[Any], kind: str, cond: Condition) -> bool:
    """Whether SQL answers ``cond`` on ``column`` exactly on a sealed index."""
    if cond.op in ("any", "never") or kind == "int":
        return True
    found = protection(column)
    if found == "plain":
        # Person-name clauses split groups with SQLite's instr(): checked here instead.
        return kind != "pn"
    return found == "fixed" and kind != "pn" and cond.op in ("equal", "list")


def split_all(
    sealer: Sealer, level: Level,
    conds: list[tuple[str, InstrumentedAttribute[Any], Condition]],
) -> tuple[list[ColumnElement[bool]], list[Residual], int]:
    """``split`` of every condition (keyword, column, condition) of one query that SQL
    cannot answer exactly: (SQL clauses, residuals, number of token prefilters). Split
    together because a prefilter's shape depends on whether it is the only one."""
    several = sum(blind.query_tokens(sealer, kw, cond) is not None
                  for kw, _, cond in conds) > 1
    sql: list[ColumnElement[bool]] = []
    left: list[Residual] = []
    prefilters = 0
    for keyword, column, cond in conds:
        clauses, check = split(sealer, level, keyword, column, cond, several=several)
        prefilters += len(clauses)
        sql.extend(clauses)
        left.extend([check] if check is not None else [])
    return sql, left, prefilters


def split(
    sealer: Sealer, level: Level, keyword: str, column: InstrumentedAttribute[Any],
    cond: Condition, *, several: bool = False,
) -> tuple[list[ColumnElement[bool]], Residual | None]:
    """The SQL clauses (prefilter included) and the residual of one condition that SQL
    cannot answer exactly (``in_sql`` false), in a query of ``level``; ``several``: the
    query has other token prefilters (``split_all``)."""
    sql: list[ColumnElement[bool]] = []
    tokens = blind.query_tokens(sealer, keyword, cond)
    if tokens is not None:
        spec = blind.TOKENED[keyword]
        if not tokens:
            return [false()], None
        owner = ENTITIES[spec.level].pk
        keys = select(spec.table.c.row_pk).where(spec.table.c.token.in_(tokens))
        if spec.level is level and not several:
            # ``pk = ANY(ARRAY(SELECT ...))``: PostgreSQL reads the keys from the token
            # index first, then the rows by primary key in key order, stopping at the
            # page's end; with ``IN`` it preferred a scan of the whole table (wide rows:
            # the sealed header) and a hash join (``bench/pg_matching.py``: 10x slower).
            sql.append(owner == any_(func.array(keys.scalar_subquery())))
        else:
            # A parent's keys (PatientName in a study query): a hashed ``IN``; an array
            # would be searched element by element for every row. Also with several
            # prefilters: the planner then estimates each from the token table's
            # statistics (an ARRAY counts as 10 rows) and starts from the narrowest;
            # with ARRAY it read a one-year range's 20,000 studies by key to keep a name
            # prefix's 100 (``bench/compare/viewer_mix.py``, 100,000 studies).
            sql.append(owner.in_(keys))
    return sql, Residual(column, cond)


def passes(residuals: list[Residual], values: Any) -> bool:
    """Whether the decrypted ``values`` (one per residual, in order) pass them all."""
    return all(r.cond.matches_stored("" if v is None else str(v))
               for r, v in zip(residuals, values, strict=True))


def passing(
    session: Session, base: Select[Any, Any, Any], level: Level,
    sql: list[ColumnElement[bool]], checks: list[Residual], modalities: Condition | None,
    meta: list[tuple[str, Any]], prefilters: int, check_budget: Callable[[], None],
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """The keys of the ``level`` records (``base``: the engine's statement for the level,
    joins included) that pass every condition, in key order, each with its parsed stored
    header when a condition read it (None otherwise).

    Only what matching needs is decrypted for a candidate: its key and the columns of
    the residual conditions (the stored header only for a non-indexed key); the caller
    loads the records of what passed by key. Ordered by key: PostgreSQL gives no stable
    order otherwise, and QIDO-RS pages (offset, limit) must not overlap."""
    entity = ENTITIES[level]
    columns: list[Any] = [entity.pk, *(r.column for r in checks)]
    if modalities is not None:
        columns.append(Study.pk)
    if meta:
        columns.append(entity.meta_json)
    stmt = base.with_only_columns(*columns).where(*sql).order_by(entity.pk)
    # A server-side cursor (rows fetched as the scan goes, not all at once). With two
    # token prefilters or more, planned for the whole result: PostgreSQL's default (10 %
    # of it) chose a "fast start" nested loop that took 5x longer than intersecting the
    # key lists first; with one, fast start is right (the keys come in order from the
    # token index). ``bench/pg_matching.py``.
    if prefilters > 1:
        session.execute(text("SELECT set_config('cursor_tuple_fraction', '1', true)"))
    for row in session.execute(stmt.execution_options(yield_per=256)):
        check_budget()
        if not passes(checks, row[1:1 + len(checks)]):
            continue
        if modalities is not None and not _modalities_match(
                session, int(row[1 + len(checks)]), modalities):
            continue
        header: dict[str, Any] | None = None
        if meta:
            header = json.loads(row[-1] or "{}")
            if not all(meta_matches(header.get(tag), cond) for tag, cond in meta):
                continue
        yield int(row[0]), header


def _modalities_match(session: Session, study_pk: int, cond: Condition) -> bool:
    """ModalitiesInStudy when its column is sealed: some visible series of the study has
    a matching modality (the embedded path's EXISTS, decided here)."""
    found = session.scalars(select(Series.modality).where(
        Series.study_pk == study_pk, Series.num_instances > 0))
    return any(cond.matches_stored(m or "") for m in found)
