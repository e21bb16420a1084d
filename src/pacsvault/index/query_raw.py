"""The embedded index's study search, compiled once per query *shape* and run on the SQLite
driver (issue 17).

Why: on the embedded index, building a search's SQLAlchemy statement (its clauses), finding
its compiled form (SQLAlchemy walks the whole new tree for a cache key) and executing it
through the ORM cost more CPU than SQLite's own work for a study list: ~0.5 ms of a QIDO-RS
or C-FIND request that answers nothing, for ~0.03-0.06 ms in SQLite. Here the SQL of a
study search is made by the very same code (``query_filter.term_clause`` on
``answer_rows.study_answers``) for stand-in conditions of the same shape as the query's
(same keys, same kind of match, as many list items, the same person-name component groups
and wildcards, the same ends of a range), compiled once, its stand-in values mapped to
their positions among the statement's parameters; every query of that shape then runs the
SQL text with its own values on the driver's connection, and the rows are converted as
SQLAlchemy converts them (``RawSelect``'s way). Same SQL, same parameters, same rows in the
same order (the tests compare both paths over a corpus of query shapes).

Only the embedded index (SQLite, no sealer) and the study level; PostgreSQL, sealed
columns and the other levels keep the SQLAlchemy path. The cache holds shapes and SQL text,
never a queried value (the stand-ins are NUL-prefixed marks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy.engine.interfaces import Dialect

from pacsvault.index import sealing
from pacsvault.index.answer_rows import study_answers
from pacsvault.index.matching import Condition, _like_pattern
from pacsvault.index.query_filter import COLUMNS, term_clause

# False: every search goes through SQLAlchemy (the tests compare both).
ENABLED = True

_MARK = "\x00rawq"  # stand-in strings; no query value reaches SQL text, only these
_LISTED = ("equal", "wildcard", "list")

Processor = Callable[[Any], Any] | None
Term = tuple[str, Condition]


@dataclass(frozen=True)
class Prepared:
    """A shape's SQL text, where each positional parameter comes from (a constant, or
    item ``j`` of term ``k``'s values) and the converters of the selected columns."""

    sql: str
    params: tuple[tuple[int, int, Any], ...]  # (term, item, constant); term -1: constant
    binds: tuple[Processor, ...]  # per positional parameter
    results: tuple[Processor, ...]  # per selected column


def _pn_groups(cond: Condition) -> list[list[str]]:
    patterns = cond.items if cond.op == "list" else (cond.value,)
    return [p.split("=")[:3] for p in patterns]  # matching._PN_GROUPS


def _group_shape(group: str) -> str:
    if group in ("", "*"):
        return group  # a literal in the SQL, or left open
    return "like" if ("*" in group or "?" in group) else "eq"


def _split(k: int, keyword: str, cond: Condition) -> tuple[Condition, list[Any]] | None:
    """(the stand-in condition of term ``k``, its values in the stand-ins' order), None
    when the term is not one this module stands in for (the SQLAlchemy path answers).
    The stand-in is the query's shape: it holds everything the SQL depends on (op, kind,
    how many items, which person-name groups are equalities, wildcards or left open,
    which ends a range has and whether it crosses midnight), and no queried value."""
    kind, op = cond.kind, cond.op
    col = COLUMNS.get(keyword)
    if keyword != "ModalitiesInStudy" and col is None:
        return None
    if col is not None and col.kind == "int":
        return None  # no study-level key is a number: series and images keep SQLAlchemy
    if kind == "pn" and op in _LISTED:
        values: list[Any] = []
        stand_ins: list[str] = []
        for groups in _pn_groups(cond):
            pieces = []
            for group in groups:
                gshape = _group_shape(group)
                if gshape in ("", "*"):
                    pieces.append(group)
                    continue
                mark = f"{_MARK}{k}.{len(values)}."
                pieces.append(mark + ("*" if gshape == "like" else ""))
                values.append(_like_pattern(group) if gshape == "like" else group)
            stand_ins.append("=".join(pieces))
        stand = (Condition("list", kind, items=tuple(stand_ins)) if op == "list"
                 else Condition(op, kind, value=stand_ins[0]))
        return stand, values
    if op == "equal":
        return Condition(op, kind, value=f"{_MARK}{k}.0."), [cond.value]
    if op == "wildcard":  # ``Condition.clause`` binds the LIKE form of the pattern
        return Condition(op, kind, value=f"{_MARK}{k}.0."), [_like_pattern(cond.value)]
    if op == "list":
        marks = [f"{_MARK}{k}.{j}." for j in range(len(cond.items))]
        return Condition(op, kind, items=tuple(marks)), list(cond.items)
    if op == "range":
        crosses = bool(kind == "time" and cond.low and cond.high and cond.low > cond.high)
        values = [v for v in (cond.low, cond.high) if v]
        # the stand-ins compare as the values do where ``_range_clause`` compares them
        marks = [f"{_MARK}{k}.{j}." for j in range(len(values))]
        if crosses:
            marks = [f"{_MARK}{k}.1.", f"{_MARK}{k}.0."]
            values = values[::-1]  # item j is the value of mark ".j."
        low = marks[0] if cond.low else ""
        high = marks[-1] if cond.high else ""
        return Condition(op, kind, low=low, high=high), values
    if op == "never":
        return cond, []
    return None


def _slot(value: Any) -> tuple[int, int] | None:
    """The (term, item) a compiled parameter's stand-in value stands for, if it is one."""
    if isinstance(value, str) and value.startswith(_MARK):
        head = value[len(_MARK):]
        if head.endswith("%"):
            head = head[:-1]  # a person-name group's LIKE form: mark + "*" -> mark + "%"
        term, item, rest = head.split(".")
        if rest:
            raise AssertionError("a stand-in value was changed on its way to SQL")
        return int(term), int(item)
    return None


def _processor(type_: Any, dialect: Dialect, kind: str) -> Processor:
    """A column type's bind or result converter on ``dialect``; None where it changes
    nothing: the sealed types pass values through on an index without a sealer."""
    if isinstance(type_, sealing.Sealed | sealing.Fixed) and sealing.sealer_of(dialect) is None:
        return None
    impl = type_.dialect_impl(dialect)
    if kind == "bind":
        return cast(Processor, impl.bind_processor(dialect))
    return cast(Processor, impl.result_processor(dialect, None))


@functools.lru_cache(maxsize=256)
def _prepare(stand_ins: tuple[Term, ...], counts: tuple[int, ...],
             dialect: Dialect) -> Prepared:
    """The search of these stand-in terms (a shape), compiled (cached per shape)."""
    clauses = []
    named: dict[str, Any] = {}
    for keyword, cond in stand_ins:
        clause, values = term_clause(keyword, cond)
        clauses.append(clause)
        named.update(values)
    stmt = study_answers().where(*clauses)
    compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    bound = compiled.construct_params(named)
    params: list[tuple[int, int, Any]] = []
    binds: list[Processor] = []
    seen: set[tuple[int, int]] = set()
    for name in compiled.positiontup or ():
        value = bound[name]
        # an expanded list item ``name_1_2`` is bound as ``name_1``
        bind = compiled.binds[name if name in compiled.binds else name.rsplit("_", 1)[0]]
        process = _processor(bind.type, dialect, "bind")
        slot = _slot(value)
        if slot is None:
            params.append((-1, 0, value if process is None else process(value)))
            binds.append(None)
        else:
            params.append((slot[0], slot[1], None))
            binds.append(process)
            seen.add(slot)
    # A value may be left out (``x AND false`` compiles to ``false``), never one added.
    if not seen <= {(k, j) for k, count in enumerate(counts) for j in range(count)}:
        raise AssertionError("the compiled search binds a value the query does not have")
    results = tuple(_processor(c.type, dialect, "result") for c in stmt.selected_columns)
    return Prepared(str(compiled), tuple(params), tuple(binds), results)


def prepared(terms: list[Term], dialect: Dialect) -> tuple[Prepared, list[list[Any]]] | None:
    """The shape's compiled search and this query's values, or None: not a shape this
    module stands in for (the SQLAlchemy path answers it)."""
    stand_ins: list[Term] = []
    values: list[list[Any]] = []
    for k, (keyword, cond) in enumerate(terms):
        found = _split(k, keyword, cond)
        if found is None:
            return None
        stand, items = found
        stand_ins.append((keyword, stand))
        values.append(items)
    counts = tuple(len(v) for v in values)
    return _prepare(tuple(stand_ins), counts, dialect), values


def arguments(found: Prepared, values: list[list[Any]]) -> tuple[Any, ...]:
    """The positional parameters of ``found``'s SQL for this query's values."""
    return tuple(const if k < 0 else (values[k][j] if process is None
                                      else process(values[k][j]))
                 for (k, j, const), process in zip(found.params, found.binds, strict=True))


def study_rows(raw: Any, found: Prepared, values: list[list[Any]]) -> Iterator[tuple[Any, ...]]:
    """``STUDY_ANSWER`` rows of the search, streamed from the driver's cursor ``raw``
    (a DB-API connection), converted as SQLAlchemy converts them."""
    cursor = raw.execute(found.sql, arguments(found, values))
    try:
        results = found.results
        plain = all(r is None for r in results)
        while True:
            batch = cursor.fetchmany(256)
            if not batch:
                return
            for row in batch:
                yield row if plain else tuple(
                    v if r is None or v is None else r(v)
                    for r, v in zip(results, row, strict=True))
    finally:
        cursor.close()
