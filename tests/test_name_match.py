"""Person-name conditions built once per shape (``index.name_match``, issue 17): the shared
expression with this query's values is the very SQL ``Condition.clause`` builds, for every
shape of pattern (one group, several groups, wildcards, open groups, lists)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import aliased

from pacsvault.index import matching, name_match
from pacsvault.index.models import Patient

PATTERNS = ["DUP*", "dupont^jean", "yamada^tarou=山田^太郎", "=山田*", "*=*=やまだ*",
            "d?p*^j*", "100%_\\x*", "a\\b\\c*", "x^y*\\=z", "dup*^*=", "==p?"]


def _sql(stmt: object, dialect: object) -> str:
    text = str(stmt.compile(dialect=dialect,  # type: ignore[attr-defined]
                            compile_kwargs={"literal_binds": True}))
    return re.sub(r"\b(pn_match|patients_\d+)\b", "inner", text)


@pytest.mark.parametrize("raw", PATTERNS)
@pytest.mark.parametrize("dialect", [sqlite.dialect()])  # PG: sealed, not this path
def test_same_sql_as_the_condition_builds(raw: str, dialect: object) -> None:
    cond = matching.parse("pn", raw)
    assert cond.op in ("equal", "wildcard", "list")
    inner = aliased(Patient)
    before = select(Patient.pk).where(
        Patient.pk.in_(select(inner.pk).where(cond.clause(inner.name_norm))))
    named = name_match.name_filter(cond)
    after = select(Patient.pk).where(named.clause).params(named.params)
    assert _sql(after, dialect) == _sql(before, dialect)


def test_one_expression_per_shape_and_no_value_kept() -> None:
    one = name_match.name_filter(matching.parse("pn", "MARTIN*"))
    two = name_match.name_filter(matching.parse("pn", "DURAND*"))
    assert one.clause is two.clause
    assert one.params != two.params
    kept = repr(name_match._template.cache_info()) + repr(
        [str(c.compile()) for c in [one.clause]])
    assert "martin" not in kept.lower() and "durand" not in kept.lower()
