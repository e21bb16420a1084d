"""Keyed blind tokens: how a sealed index (PostgreSQL, ``index.sealing``) narrows a query
on encrypted columns before pacsvault decrypts and matches the candidates itself.

Why: ``Sealed`` columns are random AES-GCM, so SQL cannot compare them; scanning and
decrypting every row of a level at every query would not meet the query targets at
100,000 studies. Each row gets a few HMAC tokens (``Sealer.token``: keyed, 128 bits; the
label names the attribute and the kind of token) in its level's token table
(``models.patient_tokens``, ``study_tokens``, ``series_tokens``; ``ON DELETE CASCADE``
with their row). A query condition becomes a set of tokens of which a matching row must
hold at least one: a *necessary* condition, never a sufficient one, so the engine still
checks every condition on the decrypted value (``Condition.matches_stored``) and the
answers are exactly the embedded index's.

Tokens kept as few as the matching needs (each one is an equality leak in a dump; the
full reasoning is in docs/postgresql-index.md, "Matching and what it leaks"):

- person names (PatientName, ReferringPhysicianName), per component group of the
  case-folded name (``normalise_name``): the whole group, and its prefixes of 1 to
  ``PREFIX_MAX`` characters. ``DOE^JOHN``, ``DOE*``, ``DO*^J*``, ``山田*`` and
  ``Yamada^Tarou=山田^太郎`` are narrowed; a pattern starting with a wildcard is not.
- dates (PatientBirthDate, StudyDate, SeriesDate, PerformedProcedureStepStartDate): the
  month (``YYYYMM``). A single date or a closed range spanning at most
  ``MONTH_SPAN_MAX`` months becomes the list of its months; an open range, none.
- nothing else: identifiers and UIDs are ``Fixed`` (SQL equality already), times,
  descriptions and the other attributes are matched after decryption only, on the rows
  the other conditions leave.

Only written when the index is sealed: on SQLite the token tables stay empty and nothing
here runs (``sealer_of`` is None).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, delete, event, insert, select
from sqlalchemy.orm import Mapper

from pacsvault.index.levels import Level
from pacsvault.index.matching import Condition
from pacsvault.index.models import (
    Patient,
    Series,
    Study,
    patient_tokens,
    series_tokens,
    study_tokens,
)
from pacsvault.index.sealing import TOKEN_BYTES, Sealer, sealer_of

# Name prefixes of 1..PREFIX_MAX characters. 4 narrows a typed ``DOE*`` or ``MÜLL*`` to a
# few hundred candidates among 100,000 patients; each extra length is one more token per
# name group and a finer equality class in a dump.
PREFIX_MAX = 4
# A date range longer than this (10 years) is not narrowed by tokens: the IN list would
# grow past what an index lookup gains over a scan.
MONTH_SPAN_MAX = 120
_PN_GROUPS = 3


@dataclass(frozen=True)
class Tokened:
    """An attribute that has tokens: its level's token table and the kind of token."""

    level: Level
    table: Table
    kind: str  # "pn" or "date"
    label: str


TOKENED: dict[str, Tokened] = {
    "PatientName": Tokened(Level.PATIENT, patient_tokens, "pn", "patient_name"),
    "PatientBirthDate": Tokened(Level.PATIENT, patient_tokens, "date", "birth_date"),
    "StudyDate": Tokened(Level.STUDY, study_tokens, "date", "study_date"),
    "ReferringPhysicianName": Tokened(Level.STUDY, study_tokens, "pn", "referring"),
    "SeriesDate": Tokened(Level.SERIES, series_tokens, "date", "series_date"),
    "PerformedProcedureStepStartDate": Tokened(Level.SERIES, series_tokens, "date",
                                               "performed_date"),
}


# --- what a row holds ----------------------------------------------------------------


def name_tokens(sealer: Sealer, label: str, norm: str) -> set[bytes]:
    """Tokens of a normalised name (``normalise_name``): each component group whole,
    and its prefixes; padded with random tokens (which no query ever asks for) to
    ``NAME_TOKENS`` so that their number does not tell a short name, a missing group or
    an empty name."""
    out: set[bytes] = set()
    for group in norm.split("=")[:_PN_GROUPS]:
        if not group:
            continue
        out.add(sealer.token(f"pn/{label}/exact", group))
        for n in range(1, min(len(group), PREFIX_MAX) + 1):
            out.add(sealer.token(f"pn/{label}/p{n}", group[:n]))
    return _padded(out, NAME_TOKENS)


# Every name has this many tokens: three groups, each whole and with PREFIX_MAX prefixes.
NAME_TOKENS = _PN_GROUPS * (1 + PREFIX_MAX)


def _padded(tokens: set[bytes], count: int) -> set[bytes]:
    while len(tokens) < count:
        tokens.add(os.urandom(TOKEN_BYTES))
    return tokens


def date_tokens(sealer: Sealer, label: str, date: str) -> set[bytes]:
    """The month token of a normalised date (none for an empty or malformed one)."""
    if len(date) != 8 or not date.isdigit():
        return set()
    if not 1 <= int(date[4:6]) <= 12:
        # ``20241305`` passes ``normalise_date`` and sorts between real months: every
        # range query asks for this token too, so it is never missed.
        return {sealer.token(f"date/{label}/odd", "")}
    return {sealer.token(f"date/{label}/month", date[:6])}


def row_tokens(sealer: Sealer, values: dict[str, str]) -> set[bytes]:
    """Tokens of one row, from its normalised values keyed by attribute keyword."""
    out: set[bytes] = set()
    for keyword, value in values.items():
        spec = TOKENED[keyword]
        if spec.kind == "pn":
            out |= name_tokens(sealer, spec.label, value or "")
        else:  # one token per date, a random one for none: no count tells an empty date
            out |= date_tokens(sealer, spec.label, value or "") or _padded(set(), 1)
    return out


def write(conn: Connection, level: Level, row_pk: int, values: dict[str, str]) -> None:
    """Write a new row's tokens (nothing on an unsealed index). ``values``: the row's
    normalised tokened attributes, by keyword."""
    sealer = sealer_of(conn.dialect)
    if sealer is None:
        return
    tokens = row_tokens(sealer, values)
    if tokens:
        conn.execute(insert(_TABLES[level]),
                     [{"token": t, "row_pk": row_pk} for t in sorted(tokens)])


_TABLES = {Level.PATIENT: patient_tokens, Level.STUDY: study_tokens,
           Level.SERIES: series_tokens}


# Each level's tokened attributes: (keyword, column of the normalised value).
_SOURCES: dict[Level, tuple[Any, tuple[tuple[str, Any], ...]]] = {
    Level.PATIENT: (Patient, (("PatientName", Patient.name_norm),
                              ("PatientBirthDate", Patient.birth_date))),
    Level.STUDY: (Study, (("StudyDate", Study.study_date),
                          ("ReferringPhysicianName", Study.referring_physician_norm))),
    Level.SERIES: (Series, (("SeriesDate", Series.series_date),
                            ("PerformedProcedureStepStartDate",
                             Series.performed_start_date))),
}


# The same, by table name and column name: what a copy or a re-encryption working on raw
# rows (``migrate``, the master key rotation) hands ``rewrite``.
TOKENED_TABLES: dict[str, tuple[Level, tuple[tuple[str, str], ...]]] = {
    entity.__tablename__: (level, tuple((keyword, column.key) for keyword, column in sources))
    for level, (entity, sources) in _SOURCES.items()
}


def rewrite(conn: Connection, sealer: Sealer, level: Level,
            rows: list[tuple[int, dict[str, str]]]) -> None:
    """Replace the tokens of ``rows`` (row key, normalised values by keyword) with
    tokens under ``sealer``'s key, in the caller's transaction: a master key rotation
    re-encrypts a chunk of rows and moves their tokens to the new token key in the same
    commit, so a row and its tokens are never under two keys."""
    if not rows:
        return
    table = _TABLES[level]
    conn.execute(delete(table).where(table.c.row_pk.in_([pk for pk, _ in rows])))
    values = [{"token": t, "row_pk": pk} for pk, found in rows
              for t in sorted(row_tokens(sealer, found))]
    if values:
        conn.execute(insert(table), values)


def rebuild(conn: Connection, batch: int = 1000) -> int:
    """Write every row's tokens again from its decrypted values (nothing on an unsealed
    index); returns how many rows. For whatever filled a sealed index without
    ``write`` (``migrate`` copying rows in) and after the token key changed (a master
    key rotation derives a new one): old tokens would match nothing."""
    sealer = sealer_of(conn.dialect)
    if sealer is None:
        return 0
    rows = 0
    for level, (entity, sources) in _SOURCES.items():
        table = _TABLES[level]
        conn.execute(delete(table))
        found = conn.execute(select(entity.pk, *(c for _, c in sources))
                             .order_by(entity.pk)).all()
        for start in range(0, len(found), batch):
            values = [{"token": t, "row_pk": row[0]}
                      for row in found[start:start + batch]
                      for t in sorted(row_tokens(sealer, {
                          k: str(v or "") for (k, _), v in zip(sources, row[1:],
                                                                strict=True)}))]
            if values:
                conn.execute(insert(table), values)
        rows += len(found)
    return rows


@event.listens_for(Patient, "after_insert")
def _patient_inserted(_mapper: Mapper[Any], conn: Connection, target: Patient) -> None:
    """Patients are added through the ORM in more than one place (store, adopt):
    their tokens are written wherever that happens, in the same transaction."""
    write(conn, Level.PATIENT, target.pk, {"PatientName": target.name_norm or "",
                                           "PatientBirthDate": target.birth_date or ""})


# --- what a query asks ----------------------------------------------------------------


def query_tokens(sealer: Sealer, keyword: str, cond: Condition) -> list[bytes] | None:
    """Tokens of which a row matching ``cond`` on ``keyword`` holds at least one; None
    when tokens cannot narrow the condition (every row stays a candidate)."""
    spec = TOKENED.get(keyword)
    if spec is None or cond.op in ("any", "never"):
        return None
    found: set[bytes] | None
    if spec.kind == "pn":
        found = _name_query(sealer, spec.label, cond)
    else:
        found = _date_query(sealer, spec.label, cond)
    return None if found is None else sorted(found)


def _name_query(sealer: Sealer, label: str, cond: Condition) -> set[bytes] | None:
    if cond.op not in ("equal", "wildcard", "list"):
        return None
    patterns = cond.items if cond.op == "list" else (cond.value,)
    out: set[bytes] = set()
    for pattern in patterns:
        one = _name_pattern(sealer, label, pattern)
        if one is None:
            return None  # one unnarrowed alternative: every row is a candidate
        out.add(one)
    return out


def _name_pattern(sealer: Sealer, label: str, pattern: str) -> bytes | None:
    """The one token a name matching ``pattern`` must hold: that of the first group the
    pattern constrains (any group for a single-group pattern, since the tokens of all
    groups share the label)."""
    for group in pattern.split("=")[:_PN_GROUPS]:
        if group in ("", "*"):
            continue
        literal = _literal_prefix(group)
        if literal == group:
            return sealer.token(f"pn/{label}/exact", group)
        if not literal:
            return None
        n = min(len(literal), PREFIX_MAX)
        return sealer.token(f"pn/{label}/p{n}", literal[:n])
    return None


def _literal_prefix(pattern: str) -> str:
    """The characters before the first wildcard."""
    cut = len(pattern)
    for wildcard in ("*", "?"):
        at = pattern.find(wildcard)
        if at >= 0:
            cut = min(cut, at)
    return pattern[:cut]


def _date_query(sealer: Sealer, label: str, cond: Condition) -> set[bytes] | None:
    if cond.op == "equal":
        return date_tokens(sealer, label, cond.value) or None
    if cond.op == "list":
        out: set[bytes] = set()
        for item in cond.items:
            token = date_tokens(sealer, label, item)
            if not token:
                return None
            out |= token
        return out
    if cond.op != "range" or not cond.low or not cond.high:
        return None
    if cond.low > cond.high:
        return set()  # matches nothing, as in SQL
    months = list(_months(cond.low[:6], cond.high[:6]))
    if len(months) > MONTH_SPAN_MAX:
        return None
    return ({sealer.token(f"date/{label}/month", m) for m in months}
            | {sealer.token(f"date/{label}/odd", "")})


def _months(low: str, high: str) -> Iterable[str]:
    """``202311``, ``202312``, ``202401`` ... up to ``high`` (at most one past the cap)."""
    year, month = int(low[:4]), min(max(int(low[4:6]), 1), 13)
    end = (int(high[:4]), int(high[4:6]))
    count = 0
    while (year, month) <= end and count <= MONTH_SPAN_MAX:
        yield f"{year:04d}{month:02d}"
        count += 1
        month += 1
        if month >= 13:
            year, month = year + 1, 1
