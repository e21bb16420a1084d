"""Patient-name conditions as SQL built once per *shape*, values bound per query (issue 17).

Why: a person-name condition (``matching._pn_clause``: component group by component group,
instr/substr/CASE on the case-folded column) is a large expression; building it took
~1.1 ms of CPU per QIDO-RS or C-FIND query with a name, more than the search itself on the
loaded dataset, and SQLAlchemy then had to walk a brand-new tree to find its compiled
form. Here the expression is built by the very same ``Condition.clause`` for a stand-in
condition of the same shape (how many patterns, how many component groups each, which
groups are wildcards, equalities or left open), its stand-in values are swapped for named
bind parameters once, and every query of that shape reuses the expression with its own
values. Same SQL, same rows: the values reach SQLite (or PostgreSQL) as parameters, as
they did before. The cache holds shapes only, never a queried value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, bindparam, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter

# The LIKE form ``Condition.clause`` gives a wildcard (* -> %, ? -> _, specials escaped).
from pacsvault.index.matching import Condition
from pacsvault.index.matching import _like_pattern as _like_pattern
from pacsvault.index.models import Patient

# One alias for every query: the subquery is never correlated with the outer query's
# patients (issue 17's ``patients.pk IN (SELECT pk FROM patients WHERE ...)``).
_INNER = aliased(Patient, name="pn_match")
_GROUPS = 3  # matching._PN_GROUPS: alphabetic, ideographic, phonetic
_MARK = "\x00pv"  # stand-in values start with a NUL, which no query value holds here

# A group's shape: "like" (has * or ?), "eq", or the literal "" / "*" (left open).
Shape = tuple[str, tuple[tuple[str, ...], ...]]


@dataclass(frozen=True)
class NameFilter:
    """The condition's clause (shared, never mutated) and its values by parameter name."""

    clause: ColumnElement[bool]
    params: dict[str, str]


def _group_shape(group: str) -> str:
    if group in ("", "*"):
        return group
    return "like" if ("*" in group or "?" in group) else "eq"


def _patterns(cond: Condition) -> tuple[str, ...]:
    return cond.items if cond.op == "list" else (cond.value,)


def shape_of(cond: Condition) -> Shape:
    return cond.op, tuple(tuple(_group_shape(g) for g in p.split("=")[:_GROUPS])
                          for p in _patterns(cond))


def _name(i: int, j: int) -> str:
    return f"pv_pn_{i}_{j}"


@functools.lru_cache(maxsize=128)
def _template(shape: Shape) -> ColumnElement[bool]:
    op, pattern_shapes = shape
    stand_ins: list[str] = []
    values: dict[str, str] = {}  # stand-in bound value -> parameter name
    for i, groups in enumerate(pattern_shapes):
        pieces = []
        for j, kind in enumerate(groups):
            if kind in ("", "*"):
                pieces.append(kind)
                continue
            mark = f"{_MARK}{i}x{j}"
            pieces.append(mark + ("*" if kind == "like" else ""))
            values[_like_pattern(mark + "*") if kind == "like" else mark] = _name(i, j)
        stand_ins.append("=".join(pieces))
    cond = (Condition("list", "pn", items=tuple(stand_ins)) if op == "list"
            else Condition(op, "pn", value=stand_ins[0]))
    built = Patient.pk.in_(select(_INNER.pk).where(cond.clause(_INNER.name_norm)))

    binds: dict[str, BindParameter[Any]] = {}

    def swap(element: Any, **_kw: Any) -> Any:
        if isinstance(element, BindParameter) and isinstance(element.value, str):
            name = values.get(element.value)
            if name is not None:
                if name not in binds:
                    binds[name] = bindparam(name, type_=element.type)
                return binds[name]
            if element.value.startswith(_MARK):
                raise AssertionError("a stand-in value was left in the name condition")
        return None

    clause: ColumnElement[bool] = visitors.replacement_traverse(built, {}, swap)
    return clause


def name_filter(cond: Condition) -> NameFilter:
    """``Condition.clause`` of a person-name condition on ``patients.name_norm`` as a
    subquery on patients, from the shape's shared expression and this query's values."""
    params: dict[str, str] = {}
    for i, pattern in enumerate(_patterns(cond)):
        for j, group in enumerate(pattern.split("=")[:_GROUPS]):
            kind = _group_shape(group)
            if kind == "like":
                params[_name(i, j)] = _like_pattern(group)
            elif kind == "eq":
                params[_name(i, j)] = group
    return NameFilter(_template(shape_of(cond)), params)
