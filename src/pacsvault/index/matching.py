"""DICOM attribute matching (PS3.4 C.2.2.2), once, for both SQL and in-memory use.

A query value is parsed into a ``Condition``; the same condition can become a SQLAlchemy
clause on an indexed column (fast path, no decryption of any image) or be evaluated on a
value taken from stored metadata (any other attribute). Sharing one parser keeps C-FIND and
QIDO-RS from drifting apart.

Person names match case-insensitively (``normalise_name``): a documented choice, since
practices type names in every case. Other strings match case-sensitively, as the standard
requires.

Wildcards in memory go through ``wildcard_match``, never a backtracking regular expression
(the pieces between stars are matched one after the other, each at its leftmost place,
with ``str.find`` or a fixed-length pattern that has no quantifier): a backtracking regex
turned ``*a*a*a*a*b`` against 200 ``a`` into seconds of CPU (minutes
with one more ``*``), a denial of service any query node could send (issue 11, defect 4).
On the SQL side SQLite's ``LIKE`` is used (no REGEXP function is registered): it gives up
on a ``%`` that cannot match instead of backtracking, and repeated ``*`` are collapsed
before either sees the pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from sqlalchemy import ColumnElement, and_, case, false, func, literal, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

Kind = Literal["str", "pn", "date", "time", "uid", "int"]

_TIME_DIGITS = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")


def normalise_name(name: str) -> str:
    """Case-insensitive person-name key; trailing empty components do not count."""
    groups = [
        "^".join(part.strip() for part in group.split("^")).rstrip("^")
        for group in name.split("=")
    ]
    return "=".join(groups).rstrip("=").casefold().upper()


def normalise_time(value: str, *, upper: bool = False) -> str:
    """'1015' -> '101500.000000'; as an upper bound '1015' -> '101559.999999'."""
    digits = value.strip().replace(":", "")
    m = _TIME_DIGITS.match(digits)
    if not m:
        return ""
    hh, mm, ss, frac = m.groups()
    fill_mm, fill_ss, fill_frac = ("59", "59", "9") if upper else ("00", "00", "0")
    if mm is None:
        return f"{hh}{fill_mm}{fill_ss}.{fill_frac * 6}"
    if ss is None:
        return f"{hh}{mm}{fill_ss}.{fill_frac * 6}"
    frac = (frac or "").ljust(6, fill_frac if frac is None else "0")
    return f"{hh}{mm}{ss}.{frac}"


def normalise_date(value: str) -> str:
    digits = value.strip().replace(".", "")  # ACR-NEMA "YYYY.MM.DD" still seen in the wild
    return digits if len(digits) == 8 and digits.isdigit() else ""


@dataclass(frozen=True)
class Condition:
    """A parsed query value. ``op`` is one of: any, never, equal, wildcard, range, list.

    ``never`` is what a malformed date or time becomes: it matches no record (not the
    records that have no value, which a naive equality on "" would return).
    """

    op: str
    kind: Kind
    value: str = ""
    low: str = ""
    high: str = ""
    items: tuple[str, ...] = ()

    @property
    def is_universal(self) -> bool:
        return self.op == "any"

    # --- SQL ---------------------------------------------------------------------------

    def clause(
        self, column: InstrumentedAttribute[str] | ColumnElement[str]
    ) -> ColumnElement[bool]:
        if self.op == "any":
            return true()
        if self.op == "never":
            return false()
        if self.kind == "pn" and self.op in ("equal", "wildcard", "list"):
            return _pn_clause(self, column)
        if self.op == "equal":
            return column == self.value
        if self.op == "list":
            return column.in_(self.items)
        if self.op == "wildcard":
            return column.like(_like_pattern(self.value), escape="\\")
        return self._range_clause(column)

    def _range_clause(
        self, column: InstrumentedAttribute[str] | ColumnElement[str]
    ) -> ColumnElement[bool]:
        if self.kind == "time" and self.low and self.high and self.low > self.high:
            # "2300-0100" crosses midnight
            return and_(column != "", or_(column >= self.low, column <= self.high))
        parts: list[ColumnElement[bool]] = [column != ""]
        if self.low:
            parts.append(column >= self.low)
        if self.high:
            parts.append(column <= self.high)
        return and_(*parts) if len(parts) > 1 else false()

    # --- in memory ---------------------------------------------------------------------

    def matches(self, raw: str) -> bool:
        if self.op == "any":
            return True
        if self.op == "never":
            return False
        return self.matches_stored(normalise(self.kind, raw))

    def matches_stored(self, value: str) -> bool:
        """What ``clause`` answers for a row whose column holds ``value`` (already in the
        index's normalised form): the residual check of a sealed index (``index.blind``),
        which cannot ask SQL to compare an encrypted column."""
        if self.op == "any":
            return True
        if self.op == "never":
            return False
        if self.kind == "pn" and self.op in ("equal", "wildcard", "list"):
            return _pn_matches(self, value)
        if self.op == "equal":
            return value == self.value
        if self.op == "list":
            return value in self.items
        if self.op == "wildcard":
            return wildcard_match(self.value, value)
        if not value:
            return False
        if self.kind == "time" and self.low and self.high and self.low > self.high:
            return value >= self.low or value <= self.high
        return (not self.low or value >= self.low) and (not self.high or value <= self.high)


# --- person names, component group by component group (PS3.4 C.2.2.2.4) -------------------
#
# A name ``Yamada^Tarou=山田^太郎=やまだ^たろう`` has three component groups (alphabetic,
# ideographic, phonetic). A pattern without ``=`` matches the name when it matches any one
# group as a whole (``山田*``, ``Yamada*`` and ``やまだ*`` all find it; matching the whole
# value made ``山田*`` find nothing, issue 13 defect 10); a pattern with ``=`` groups
# matches group by group, an empty or ``*`` pattern group matching anything. The index
# keeps one case-folded column for the whole value (no migration): SQL splits it on
# ``=`` with instr/substr, and the in-memory path splits the same normalised string.

_PN_GROUPS = 3


def _pn_pattern_groups(value: str) -> list[str]:
    return value.split("=")[:_PN_GROUPS]


def _pn_test_memory(pattern: str, group: str) -> bool:
    if "*" in pattern or "?" in pattern:
        return wildcard_match(pattern, group)
    return pattern == group


def _pn_one_matches(pattern: str, value: str) -> bool:
    groups = value.split("=")
    wanted = _pn_pattern_groups(pattern)
    if len(wanted) == 1:
        return any(_pn_test_memory(wanted[0], g) for g in groups[:_PN_GROUPS])
    groups += [""] * (_PN_GROUPS - len(groups))
    return all(p in ("", "*") or _pn_test_memory(p, g)
               for p, g in zip(wanted, groups, strict=False))


def _pn_matches(cond: Condition, value: str) -> bool:
    patterns = cond.items if cond.op == "list" else (cond.value,)
    return any(_pn_one_matches(p, value) for p in patterns)


def _sql_groups(
    column: InstrumentedAttribute[str] | ColumnElement[str],
) -> tuple[ColumnElement[str], ColumnElement[str], ColumnElement[str]]:
    """The three component groups of a stored name, as SQL expressions ('' if absent)."""
    first = func.instr(column, "=")
    alphabetic = case((first > 0, func.substr(column, 1, first - 1)), else_=column)
    rest = case((first > 0, func.substr(column, first + 1)), else_=literal(""))
    second = func.instr(rest, "=")
    ideographic = case((second > 0, func.substr(rest, 1, second - 1)), else_=rest)
    phonetic = case((second > 0, func.substr(rest, second + 1)), else_=literal(""))
    return alphabetic, ideographic, phonetic


class _Unplanned(FunctionElement[str]):
    """A LIKE pattern's bound value, out of sight of SQLite's query planner: ``? || ''``
    on SQLite (the same text), the bare parameter elsewhere (PostgreSQL's SQL unchanged).

    Why: a bare parameter on the right of LIKE is one SQLite's planner looks at (the LIKE
    optimisation, possible here since ``case_sensitive_like`` is on), so binding it marks
    the statement expired and SQLite recompiles the whole statement on every execution
    (sqlite3_prepare_v2: "the value bound to a host parameter ... might influence the
    choice of query plan"). A person-name LIKE sits inside OR/CASE on a group split by
    instr/substr, where no index can serve it: the recompilation bought nothing and cost
    ~0.3 ms of a QIDO-RS ``PatientName=DUP*`` (a statement of ~60 parameters), ~8 times
    the whole statement's own run. Same pattern value, same rows."""

    inherit_cache = True
    name = "pv_unplanned"


@compiles(_Unplanned)
def _unplanned(element: _Unplanned, compiler: SQLCompiler, **kw: object) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_Unplanned, "sqlite")
def _unplanned_sqlite(element: _Unplanned, compiler: SQLCompiler, **kw: object) -> str:
    return f"({compiler.process(element.clauses, **kw)} || '')"


def _pn_test_sql(
    pattern: str, group: InstrumentedAttribute[str] | ColumnElement[str],
) -> ColumnElement[bool]:
    if "*" in pattern or "?" in pattern:
        # The bound parameter like() makes (name, type), wrapped (``_Unplanned``).
        bound = group.like(_like_pattern(pattern), escape="\\").right
        return group.like(_Unplanned(bound), escape="\\")
    return group == pattern


def _pn_one_clause(
    pattern: str, column: InstrumentedAttribute[str] | ColumnElement[str],
) -> ColumnElement[bool]:
    wanted = _pn_pattern_groups(pattern)
    groups = _sql_groups(column)
    if len(wanted) == 1:
        # A single-group name (most names) is tested once, on the column itself.
        return or_(
            and_(func.instr(column, "=") == 0, _pn_test_sql(wanted[0], column)),
            and_(func.instr(column, "=") > 0,
                 or_(*(_pn_test_sql(wanted[0], g) for g in groups))),
        )
    tests = [_pn_test_sql(p, g) for p, g in zip(wanted, groups, strict=False) if p not in ("", "*")]
    return and_(*tests) if tests else true()


def _pn_clause(
    cond: Condition, column: InstrumentedAttribute[str] | ColumnElement[str],
) -> ColumnElement[bool]:
    patterns = cond.items if cond.op == "list" else (cond.value,)
    return or_(*(_pn_one_clause(p, column) for p in patterns))


def normalise(kind: Kind, raw: str) -> str:
    """The comparable form of a stored value (what the index columns hold)."""
    if kind == "pn":
        return normalise_name(raw)
    if kind == "date":
        return normalise_date(raw)
    if kind == "time":
        return normalise_time(raw)
    return raw.strip()


def parse(kind: Kind, raw: str) -> Condition:
    """Parse one query value according to the attribute's kind."""
    text = raw.strip()
    if text in ("", "*"):
        return Condition("any", kind)
    if kind == "uid" and "\\" in text:
        return Condition("list", kind, items=tuple(t.strip() for t in text.split("\\")))
    if kind in ("date", "time") and "-" in text:
        low_text, _, high_text = (part.strip() for part in text.partition("-"))
        if kind == "date":
            low, high = normalise_date(low_text), normalise_date(high_text)
        else:
            low, high = normalise_time(low_text), normalise_time(high_text, upper=True)
        if (low_text and not low) or (high_text and not high) or not (low or high):
            return Condition("never", kind)
        return Condition("range", kind, low=low, high=high)
    if kind in ("str", "pn") and ("*" in text or "?" in text):
        pattern = normalise_name(text) if kind == "pn" else text
        return Condition("wildcard", kind, value=collapse_stars(pattern))
    if kind == "time":
        # A single time of lower precision matches the whole period it names.
        low, high = normalise_time(text), normalise_time(text, upper=True)
        if not low:
            return Condition("never", kind)
        return Condition("range", kind, low=low, high=high)
    if kind == "date" and not normalise_date(text):
        return Condition("never", kind)
    if kind != "uid" and "\\" in text:
        # A value list on a non-UID attribute: match any of them (PS3.4 C.2.2.2.8 allows
        # this for some keys; accepting it everywhere is harmless and convenient).
        return Condition("list", kind, items=tuple(normalise(kind, t) for t in text.split("\\")))
    return Condition("equal", kind, value=normalise(kind, text))


def _like_pattern(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def collapse_stars(pattern: str) -> str:
    """``a**b`` -> ``a*b``: same meaning, less work for every matcher."""
    while "**" in pattern:
        pattern = pattern.replace("**", "*")
    return pattern


def wildcard_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` as a whole (``*`` any run, ``?`` one character).

    Linear in practice and O(len(value) * len(pattern)) at worst, whatever the pattern:
    the pieces between stars are found left to right, each at its leftmost place
    (``str.find`` for their literal part), and a piece is never revisited. Leftmost is
    always right because a ``*`` before the next piece can absorb whatever follows.
    """
    parts = pattern.split("*")
    if len(parts) == 1:
        return len(pattern) == len(value) and _piece_at(pattern, value, 0)
    first, middle, last = parts[0], parts[1:-1], parts[-1]
    end = len(value) - len(last)
    if len(first) > end or not _piece_at(first, value, 0) or not _piece_at(last, value, end):
        return False
    pos = len(first)
    for piece in middle:
        if piece:
            found = _find_piece(piece, value, pos, end)
            if found < 0:
                return False
            pos = found + len(piece)
    return True


def _piece_at(piece: str, value: str, start: int) -> bool:
    """``piece`` (literal characters and ``?``) matches ``value`` at ``start``."""
    if start < 0 or start + len(piece) > len(value):
        return False
    if "?" not in piece:
        return value.startswith(piece, start)
    return _fixed(piece).match(value, start, start + len(piece)) is not None


def _find_piece(piece: str, value: str, start: int, end: int) -> int:
    """Leftmost position >= start where ``piece`` matches within ``value[:end]``, or -1."""
    if "?" not in piece:
        return value.find(piece, start, end)
    found = _fixed(piece).search(value, start, end)
    return -1 if found is None else found.start()


@lru_cache(maxsize=256)
def _fixed(piece: str) -> re.Pattern[str]:
    """A piece between stars as a fixed-length pattern (literals and ``.``, no quantifier,
    no alternation): nothing to backtrack into, so a search costs at most
    len(value) x len(piece) character comparisons, in C."""
    return re.compile("".join("." if c == "?" else re.escape(c) for c in piece), re.DOTALL)
