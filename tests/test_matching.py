"""Unit tests of ``pacsvault.index.matching`` (PS3.4 C.2.2.2), no server involved.

Each rule is checked twice: in memory (``Condition.matches``) and as the SQL clause the
index uses (``Condition.clause``), executed on an in-memory SQLite table configured like the
real index (``PRAGMA case_sensitive_like=ON``). Both paths must give the same answer, since
C-FIND matches indexed attributes in SQL and every other attribute in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, select
from sqlalchemy.engine import Engine

from pacsvault.index.matching import (
    Condition,
    Kind,
    normalise,
    normalise_date,
    normalise_name,
    normalise_time,
    parse,
)

# --- normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("Müller^Jürgen", "MÜLLER^JÜRGEN"),
    ("müller^jürgen", "MÜLLER^JÜRGEN"),
    ("MÜLLER^JÜRGEN", "MÜLLER^JÜRGEN"),
    ("Lefèvre^Hélène", "LEFÈVRE^HÉLÈNE"),
    ("Wałęsa^Łukasz", "WAŁĘSA^ŁUKASZ"),
    ("Doe^John^Quincy^Dr.^Jr.", "DOE^JOHN^QUINCY^DR.^JR."),
    # trailing empty components and groups do not count
    ("Smith^Anne^^^", "SMITH^ANNE"),
    ("Smith^Anne^^^==", "SMITH^ANNE"),
    ("Smith^^^^Jr.", "SMITH^^^^JR."),
    # blanks around components are padding, not content
    ("  Doe ^ John ", "DOE^JOHN"),
    ("", ""),
    # ideographic and phonetic groups are kept
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "YAMADA^TAROU=山田^太郎=やまだ^たろう"),
    # full case folding, not just lower(): ß folds to SS
    ("Straße^Jörg", "STRASSE^JÖRG"),
])
def test_normalise_name(raw: str, expected: str) -> None:
    assert normalise_name(raw) == expected


def test_normalise_name_is_idempotent_and_case_blind() -> None:
    for name in ("Müller^Jürgen", "lefèvre^hélène", "Doe^John^^^", "ÅSE^ANDERSEN"):
        once = normalise_name(name)
        assert normalise_name(once) == once
        assert normalise_name(name.lower()) == normalise_name(name.upper()) == once


@pytest.mark.parametrize(("raw", "low", "high"), [
    ("10", "100000.000000", "105959.999999"),
    ("1015", "101500.000000", "101559.999999"),
    ("101530", "101530.000000", "101530.999999"),
    ("101530.5", "101530.500000", "101530.500000"),
    ("101530.123456", "101530.123456", "101530.123456"),
    ("10:15", "101500.000000", "101559.999999"),  # ACR-NEMA separators
    ("10:15:30", "101530.000000", "101530.999999"),
    (" 2330 ", "233000.000000", "233059.999999"),
    ("000000", "000000.000000", "000000.999999"),
])
def test_normalise_time(raw: str, low: str, high: str) -> None:
    assert normalise_time(raw) == low
    assert normalise_time(raw, upper=True) == high


@pytest.mark.parametrize("raw", ["", "abc", "1", "101", "1015309", "101530.1234567"])
def test_normalise_time_rejects_malformed(raw: str) -> None:
    assert normalise_time(raw) == ""
    assert normalise_time(raw, upper=True) == ""


def test_normalised_times_sort_chronologically() -> None:
    raw = ["235959.999", "0000", "00", "083000", "0830", "141500.5", "1415", "23"]
    ordered = sorted(raw, key=normalise_time)
    assert [normalise_time(t) for t in ordered] == sorted(normalise_time(t) for t in raw)
    assert ordered[0] in ("0000", "00") and ordered[-1] == "235959.999"


@pytest.mark.parametrize(("raw", "expected"), [
    ("20240110", "20240110"),
    (" 20240110 ", "20240110"),
    ("2024.01.10", "20240110"),  # ACR-NEMA
    ("2024", ""),
    ("202401", ""),
    ("2024-01-10", ""),
    ("2024011O", ""),
    ("", ""),
])
def test_normalise_date(raw: str, expected: str) -> None:
    assert normalise_date(raw) == expected


@pytest.mark.parametrize(("kind", "raw", "expected"), [
    ("pn", "müller^jürgen^^", "MÜLLER^JÜRGEN"),
    ("date", "2024.01.10", "20240110"),
    ("time", "0830", "083000.000000"),
    ("str", "  ACC1001 ", "ACC1001"),
    ("uid", " 1.2.3 ", "1.2.3"),
    ("int", "7", "7"),
])
def test_normalise_dispatches_on_kind(kind: Kind, raw: str, expected: str) -> None:
    assert normalise(kind, raw) == expected


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["str", "pn", "date", "time", "uid", "int"])
@pytest.mark.parametrize("raw", ["", "   ", "*"])
def test_parse_universal(kind: Kind, raw: str) -> None:
    """C.2.2.2.3: a zero-length value matches everything; C.2.2.2.4: so does "*"."""
    cond = parse(kind, raw)
    assert cond.is_universal
    assert cond == Condition("any", kind)


@pytest.mark.parametrize(("kind", "raw", "expected"), [
    # C.2.2.2.1 single value
    ("str", "ACC1001", Condition("equal", "str", value="ACC1001")),
    ("pn", "Müller^Jürgen", Condition("equal", "pn", value="MÜLLER^JÜRGEN")),
    ("pn", "smith^anne^^^", Condition("equal", "pn", value="SMITH^ANNE")),
    ("date", "20240110", Condition("equal", "date", value="20240110")),
    ("uid", "1.2.840.10008.5.1.4.1.1.4", Condition("equal", "uid",
                                                   value="1.2.840.10008.5.1.4.1.1.4")),
    ("int", "3", Condition("equal", "int", value="3")),
    # no wildcard matching on UIDs (C.2.2.2.4 excludes UI): the value is literal
    ("uid", "1.2.*", Condition("equal", "uid", value="1.2.*")),
    # a single time of lower precision names the whole period
    ("time", "0830", Condition("range", "time", low="083000.000000", high="083059.999999")),
    # C.2.2.2.2 list of UIDs
    ("uid", "1.2.3\\1.2.4\\ 1.2.5", Condition("list", "uid", items=("1.2.3", "1.2.4", "1.2.5"))),
    # C.2.2.2.4 wildcards: names are case-folded, other strings kept as given
    ("pn", "müller*", Condition("wildcard", "pn", value="MÜLLER*")),
    ("pn", "doe^j?n*", Condition("wildcard", "pn", value="DOE^J?N*")),
    ("str", "mr*", Condition("wildcard", "str", value="mr*")),
    ("str", "ACC?001", Condition("wildcard", "str", value="ACC?001")),
    # C.2.2.2.5 ranges
    ("date", "20240101-", Condition("range", "date", low="20240101")),
    ("date", "-20241231", Condition("range", "date", high="20241231")),
    ("date", "20240101-20241231",
     Condition("range", "date", low="20240101", high="20241231")),
    ("time", "2300-0100", Condition("range", "time", low="230000.000000",
                                    high="010059.999999")),
    ("time", "1400-", Condition("range", "time", low="140000.000000")),
    ("time", "-0100", Condition("range", "time", high="010059.999999")),
    # value lists on other attributes (e.g. Modalities in Study "CT\MR")
    ("str", "CT\\MR", Condition("list", "str", items=("CT", "MR"))),
    ("pn", "doe^jane\\Smith^Anne^", Condition("list", "pn", items=("DOE^JANE", "SMITH^ANNE"))),
])
def test_parse(kind: Kind, raw: str, expected: Condition) -> None:
    assert parse(kind, raw) == expected


# --- in-memory and SQL matching, side by side -----------------------------------------

STORED: dict[Kind, list[str]] = {
    "pn": ["Müller^Jürgen", "MÜLLER^ANNA", "Lefèvre^Hélène", "Doe^John^Quincy^Dr.^Jr.",
           "Doe^Jane", "", "Wałęsa^Łukasz", "Smith^Anne^^^", "Andersen^Åse",
           "Yamada^Tarou=山田^太郎"],
    "str": ["ACC1001", "ACC1002", "ACC2001", "acc3001", "", "100% CONTRAST", "100X CONTRAST",
            "A_B", "AXB", "back\\slash", "MR KNEE LEFT", "mr knee right"],
    "date": ["20240110", "20240215", "20240216", "20231231", "20221015", "", "20240401"],
    "time": ["083000", "141500.5", "233000", "003000", "000000", "235900", "100000", "",
             "120000", "2330"],
    "uid": ["1.2.3", "1.2.4", "1.2.30", "1.2.3.4"],
}

# (kind, query, raw values that must match)
CASES: list[tuple[Kind, str, set[str]]] = [
    # universal: empty values included
    ("pn", "", set(STORED["pn"])),
    ("pn", "*", set(STORED["pn"])),
    ("date", "", set(STORED["date"])),
    # single value, names case-insensitive, trailing empty components ignored
    ("pn", "müller^jürgen", {"Müller^Jürgen"}),
    ("pn", "MÜLLER^JÜRGEN", {"Müller^Jürgen"}),
    ("pn", "Smith^Anne", {"Smith^Anne^^^"}),
    ("pn", "smith^anne^^^", {"Smith^Anne^^^"}),
    ("pn", "Doe^John", set()),  # single value matching is exact, components included
    ("pn", "Doe^John^Quincy^Dr.^Jr.", {"Doe^John^Quincy^Dr.^Jr."}),
    # wildcards on names
    ("pn", "müller*", {"Müller^Jürgen", "MÜLLER^ANNA"}),
    ("pn", "M?LLER^*", {"Müller^Jürgen", "MÜLLER^ANNA"}),
    ("pn", "*ller^j*", {"Müller^Jürgen"}),
    ("pn", "doe^*", {"Doe^John^Quincy^Dr.^Jr.", "Doe^Jane"}),
    ("pn", "doe^j?n*", {"Doe^Jane"}),
    ("pn", "*łukasz", {"Wałęsa^Łukasz"}),
    ("pn", "a*", {"Andersen^Åse"}),  # the empty name does not match A*
    ("pn", "*^åse", {"Andersen^Åse"}),
    ("pn", "*", set(STORED["pn"])),
    ("pn", "?*", set(STORED["pn"]) - {""}),
    ("pn", "Yamada^Tarou*", {"Yamada^Tarou=山田^太郎"}),
    # single value on strings: case-sensitive, exact
    ("str", "ACC1001", {"ACC1001"}),
    ("str", "acc1001", set()),
    ("str", "ACC", set()),
    # wildcards on strings: case-sensitive
    ("str", "ACC100?", {"ACC1001", "ACC1002"}),
    ("str", "ACC?001", {"ACC1001", "ACC2001"}),
    ("str", "acc*", {"acc3001"}),
    ("str", "*2001", {"ACC2001"}),
    ("str", "MR*", {"MR KNEE LEFT"}),
    ("str", "mr*", {"mr knee right"}),
    ("str", "*KNEE*", {"MR KNEE LEFT"}),
    ("str", "?*", set(STORED["str"]) - {""}),
    # SQL LIKE metacharacters are literals in DICOM
    ("str", "100%*", {"100% CONTRAST"}),
    ("str", "A_*", {"A_B"}),
    ("str", "A?B", {"A_B", "AXB"}),
    ("str", "back\\slash", set()),  # a backslash separates values: list of two
    # dates
    ("date", "20240110", {"20240110"}),
    ("date", "20240101-", {"20240110", "20240215", "20240216", "20240401"}),
    ("date", "-20231231", {"20231231", "20221015"}),
    ("date", "20240215-20240401", {"20240215", "20240216", "20240401"}),
    ("date", "20240110-20240110", {"20240110"}),
    ("date", "2024.01.01-2024.02.15", {"20240110", "20240215"}),
    # times, including ranges that cross midnight; empty values never match a range
    ("time", "0830", {"083000"}),
    ("time", "141500", {"141500.5"}),
    ("time", "0800-1200", {"083000", "100000", "120000"}),
    ("time", "1400-", {"141500.5", "233000", "235900", "2330"}),
    ("time", "-0100", {"003000", "000000"}),
    ("time", "2300-0100", {"233000", "003000", "000000", "235900", "2330"}),
    ("time", "2359-0001", {"000000", "235900"}),
    ("time", "233000-233000", {"233000", "2330"}),
    # UIDs
    ("uid", "1.2.3", {"1.2.3"}),
    ("uid", "1.2.3\\1.2.30\\9.9.9", {"1.2.3", "1.2.30"}),
    ("uid", "1.2.3*", set()),
]


def _ids(case: tuple[Kind, str, set[str]]) -> str:
    return f"{case[0]}:{case[1]!r}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_matches_in_memory(case: tuple[Kind, str, set[str]]) -> None:
    kind, query, expected = case
    cond = parse(kind, query)
    assert {raw for raw in STORED[kind] if cond.matches(raw)} == expected


@pytest.fixture(scope="module")
def sqlite() -> Iterator[Engine]:
    engine = create_engine("sqlite://")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: object, _record: object) -> None:
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute("PRAGMA case_sensitive_like=ON")  # as the real index does
        cur.close()

    yield engine
    engine.dispose()


_META = MetaData()
_VALUES = Table(
    "vals", _META,
    Column("pk", Integer, primary_key=True),
    Column("raw", String),
    Column("norm", String),
)


def _sql_matches(engine: Engine, kind: Kind, cond: Condition) -> set[str]:
    """Store the values normalised as the archive does, and select with the clause."""
    with engine.begin() as conn:
        _META.drop_all(conn)
        _META.create_all(conn)
        conn.execute(_VALUES.insert(), [
            {"raw": raw, "norm": normalise(kind, raw)} for raw in STORED[kind]
        ])
        rows = conn.execute(select(_VALUES.c.raw).where(cond.clause(_VALUES.c.norm)))
        return {r[0] for r in rows}


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_clause_in_sqlite(sqlite: Engine, case: tuple[Kind, str, set[str]]) -> None:
    kind, query, expected = case
    assert _sql_matches(sqlite, kind, parse(kind, query)) == expected


def test_sqlite_like_needs_case_sensitive_pragma() -> None:
    """Why the index sets the pragma: SQLite's LIKE is case-blind for ASCII by default."""
    plain = create_engine("sqlite://")
    try:
        cond = parse("str", "mr*")
        assert _sql_matches(plain, "str", cond) == {"mr knee right", "MR KNEE LEFT"}
    finally:
        plain.dispose()


def test_clause_compiles_to_expected_sql() -> None:
    col = _VALUES.c.norm
    compiled = {
        query: str(parse(kind, query).clause(col).compile(
            compile_kwargs={"literal_binds": True}))
        for kind, query in cast(list[tuple[Kind, str]], [
            ("str", "A_B*"), ("date", "20240101-"), ("time", "2300-0100"),
            ("uid", "1.2\\1.3"), ("str", "X"), ("str", "")])
    }
    assert compiled["A_B*"] == "vals.norm LIKE 'A\\_B%' ESCAPE '\\'"
    assert compiled["20240101-"] == "vals.norm != '' AND vals.norm >= '20240101'"
    assert compiled["2300-0100"] == (
        "vals.norm != '' AND (vals.norm >= '230000.000000' OR vals.norm <= '010059.999999')"
    )
    assert compiled["1.2\\1.3"] == "vals.norm IN ('1.2', '1.3')"
    assert compiled["X"] == "vals.norm = 'X'"
    assert compiled[""] == "true"


@pytest.mark.parametrize(("kind", "query"), [("date", "-"), ("date", "2024-"),
                                             ("date", "-2024"), ("time", "-")])
def test_degenerate_range_same_in_sql_and_memory(
    sqlite: Engine, kind: Kind, query: str
) -> None:
    cond = parse(kind, query)
    in_memory = {raw for raw in STORED[kind] if cond.matches(raw)}
    assert in_memory == _sql_matches(sqlite, kind, cond)


def test_matches_ignores_padding_of_stored_values() -> None:
    assert parse("str", "ACC1001").matches("ACC1001 ")
    assert parse("pn", "doe^jane").matches("Doe^Jane ")
    assert parse("date", "20240110").matches("20240110 ")
    assert parse("time", "0830").matches("083000 ")


def test_wildcard_matches_across_lines() -> None:
    # LT/UT values may contain line breaks: "*" still spans them
    assert parse("str", "first*last").matches("first line\r\nlast")


@pytest.mark.parametrize("query", ["2024011", "2024"])
def test_malformed_single_date_does_not_match_empty(sqlite: Engine, query: str) -> None:
    cond = parse("date", query)
    assert not cond.matches("")
    assert "" not in _sql_matches(sqlite, "date", cond)
