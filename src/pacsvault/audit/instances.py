"""One accountable trail for several instances sharing an index (issue 16, part 3).

Each instance (a data directory of the vault: ``vault.json`` ``instance``) keeps its own
hash-chained, signed trail file, anchored by its own ``audit_head`` row. On a shared
(PostgreSQL) index every line an instance appends is also copied into ``audit_lines`` in
the transaction that moves its anchor, so:

- ``pacsvault audit verify`` on any instance checks every instance's chain from the index
  (signatures, order, the anchor, the broken flag another instance's append raised) and
  its own file against its copy (``verify_all``);
- ``audit show`` merges every instance's records by time (``merged_records``);
- each instance appends a signed *checkpoint* record at start, stop and every
  ``[audit] checkpoint_seconds``, naming the other instances' heads (seq, record hash)
  read from their anchors (``checkpoint``, ``CheckpointRunner``): a chain that was cut or
  rewritten later (in its file and in the index together) no longer reaches what another
  instance witnessed, and verification says so.

Why copies and not one chain for the deployment: one chain would serialise every
instance's stores on one row lock and one file; here an instance's appends only touch its
own anchor row, and the lines are already signed with patient references sealed, so the
copy adds nothing readable to a database dump. The embedded index (SQLite: one instance)
copies nothing and writes no checkpoint: it behaves as before instances existed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from cryptography.exceptions import InvalidTag
from sqlalchemy import Connection, Engine, Table, delete, func, insert, literal, select
from sqlalchemy.exc import IntegrityError

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.audit.trail_format import (
    Chain,
    KeyPlan,
    Record,
    TrailKeys,
    parse_line,
    record_hash,
)
from pacsvault.audit.trail_refs import unseal
from pacsvault.audit.trail_verify import scan
from pacsvault.index.models import AuditHead, AuditLine

if TYPE_CHECKING:
    from pacsvault.audit.trail import AuditTrail

log = logging.getLogger("pacsvault.audit")

MAIN = "main"
CHECKPOINT_ACTION = "audit.checkpoint"
CHECKPOINT_KIND = "checkpoint"

_heads = cast(Table, AuditHead.__table__)
_lines = cast(Table, AuditLine.__table__)


def kind_of(action: str) -> str:
    """The record ``kind`` of an appended event: checkpoints are told apart so that the
    verifier trusts only what this module wrote as a witness."""
    return CHECKPOINT_KIND if action == CHECKPOINT_ACTION else "event"


# --- the copy (appender side; the caller holds the trail and the transaction) -----------


def lines_of(path: Path, after: int, upto: int) -> list[tuple[int, bytes]]:
    """The record lines of a trail file with ``after < seq <= upto``, in file order (a
    retention seal first, with the seq of the last record it sealed)."""
    found: list[tuple[int, bytes]] = []
    if not path.exists():
        return found
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\n")
            body = parse_line(line)
            if body is None:
                continue
            try:
                seq = int(body["seq"])
            except (KeyError, TypeError, ValueError):
                continue
            if after < seq <= upto:
                found.append((seq, line))
    return found


def copy_lines(conn: Connection, instance: str, new: list[tuple[int, bytes]],
               local: Callable[[int, int], list[tuple[int, bytes]]]) -> None:
    """Copy ``new`` (seq, line) into ``audit_lines``, in the caller's transaction (the one
    moving the anchor). Lines the index lacks before them (a store batch whose transaction
    rolled back after its lines were written, or a trail older than the copy) are taken
    from the local file first. A seq the index already holds is never overwritten: after
    a truncated file the index keeps the evidence (the anchor is flagged broken)."""
    if not new:
        return
    if conn.dialect.name == "postgresql":
        # Once per trail append (every store batch): straight to the driver, same
        # connection and transaction; SQLAlchemy's statement build and result objects were
        # ~0.3 ms of CPU per image in serve's profile (issue 16, bench/RESULTS.md).
        cursor = conn.connection.cursor()
        try:
            cursor.execute(_PG_LAST_LINE, (instance,))
            got = cursor.fetchone()
            last = int(got[0] or 0) if got else 0
            todo = _with_catch_up(new, last, local)
            if todo:
                cursor.executemany(_PG_INSERT_LINE, [(instance, seq, text) for seq, text in todo])
        finally:
            cursor.close()
        return
    held = conn.execute(select(func.max(_lines.c.seq))
                        .where(_lines.c.instance == instance)).scalar()
    values = [{"instance": instance, "seq": seq, "line": text}
              for seq, text in _with_catch_up(new, int(held or 0), local)]
    if values:
        conn.execute(insert(_lines), values)


_PG_LAST_LINE = "SELECT max(seq) FROM audit_lines WHERE instance = %s"
_PG_INSERT_LINE = "INSERT INTO audit_lines (instance, seq, line) VALUES (%s, %s, %s)"


def _with_catch_up(new: list[tuple[int, bytes]], last: int,
                   local: Callable[[int, int], list[tuple[int, bytes]]],
                   ) -> list[tuple[int, str]]:
    """The (seq, line) to insert after the index's ``last``: the local file's lines the
    index lacks before ``new``, then ``new``; never a seq the index holds."""
    first = new[0][0]
    rows = local(last, first - 1) if first - 1 > last else []
    rows += new
    return [(seq, line.rstrip(b"\n").decode("ascii")) for seq, line in rows if seq > last]


class AnchorRow(NamedTuple):
    """The anchor row's columns the appender checks the file's tip against."""

    seq: int
    digest: str
    broken: str


def read_head(conn: Connection, instance: str) -> Any:
    """``instance``'s anchor row (seq, digest, broken) or None. On a shared index it is
    read at every append that follows another worker's or instance's (the tip is not the
    appender's own): straight to the driver there, like the line copy (issue 16)."""
    if conn.dialect.name != "postgresql":
        return conn.execute(select(_heads).where(_heads.c.instance == instance)).first()
    cursor = conn.connection.cursor()
    try:
        cursor.execute("SELECT seq, digest, broken FROM audit_head WHERE instance = %s",
                       (instance,))
        row = cursor.fetchone()
    finally:
        cursor.close()
    return None if row is None else AnchorRow(int(row[0]), str(row[1]), str(row[2] or ""))


def insert_anchor(conn: Connection, instance: str, seq: int, digest: str, *,
                  retry: bool) -> None:
    """This instance's first anchor row. The id is the next free one, taken in the
    statement: two instances starting at once may pick the same id; the loser retries
    (``retry``: a shared index) under a savepoint, so the caller's batch survives."""
    stmt = insert(_heads).from_select(
        ["id", "instance", "seq", "digest", "broken"],
        select(func.coalesce(func.max(_heads.c.id), 0) + 1, literal(instance),
               literal(seq), literal(digest), literal("")))
    if not retry:
        conn.execute(stmt)
        return
    for attempt in range(5):
        try:
            with conn.begin_nested():
                conn.execute(stmt)
            return
        except IntegrityError:
            if attempt == 4:
                raise


def seal_copy(engine: Engine | None, instance: str, path: Path) -> None:
    """After retention sealed the file's prefix: the index copy drops the same records and
    starts with the same seal line, so both still verify the same way."""
    if engine is None:
        return
    with open(path, "rb") as fh:
        first = fh.readline().rstrip(b"\n")
    body = parse_line(first)
    if body is None or body.get("kind") != "seal":
        return
    seq = int(body["seq"])
    with engine.begin() as conn:
        conn.execute(delete(_lines).where(_lines.c.instance == instance, _lines.c.seq <= seq))
        conn.execute(insert(_lines).values(instance=instance, seq=seq,
                                           line=first.decode("ascii")))


# --- checkpoints ------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    instance: str
    seq: int
    digest: str
    broken: str


def heads(engine: Engine) -> dict[str, Head]:
    """Every instance's anchor, by name."""
    with engine.connect() as conn:
        rows = conn.execute(select(_heads.c.instance, _heads.c.seq, _heads.c.digest,
                                   _heads.c.broken)).all()
    return {str(r.instance or MAIN): Head(str(r.instance or MAIN), int(r.seq), str(r.digest),
                                          str(r.broken or "")) for r in rows}


def checkpoint(trail: AuditTrail, reason: str) -> int | None:
    """Append a signed checkpoint naming the other instances' current heads; None on an
    embedded index (one instance: nothing to witness)."""
    engine = trail.engine
    if not trail.copies or engine is None:
        return None
    others = {name: head for name, head in heads(engine).items() if name != trail.instance}
    detail: dict[str, str | int | bool] = {"reason": reason, "instances": len(others)}
    for name, head in sorted(others.items()):
        detail[f"{name}.seq"] = head.seq
        detail[f"{name}.digest"] = head.digest
    return trail.append(AuditEvent(
        action=CHECKPOINT_ACTION, outcome=Outcome.SUCCESS,
        code=EventCode.APPLICATION_ACTIVITY, actor_user="system",
        message=f"heads of the other instances witnessed by {trail.instance}",
        detail=detail))


class CheckpointRunner:
    """``serve``'s checkpoints: one at start, one every ``interval`` seconds, one at stop.
    A checkpoint that cannot be written is logged (the next one tries again)."""

    def __init__(self, trail: AuditTrail, interval: float) -> None:
        self._trail = trail
        self._interval = max(1.0, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint",
                                        daemon=True)

    def _write(self, reason: str) -> None:
        try:
            checkpoint(self._trail, reason)
        except Exception as exc:  # the trail's own failures are alerted by its writer
            log.error("audit checkpoint (%s) failed: %s", reason, type(exc).__name__)

    def start(self) -> None:
        if not self._trail.copies:
            return
        self._write("start")
        self._thread.start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(10)
        self._write("stop")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._write("periodic")


# --- verification of the deployment -----------------------------------------------------


@dataclass(frozen=True)
class InstanceVerdict:
    instance: str
    ok: bool
    records: int
    problem: str = ""


@dataclass(frozen=True)
class Witness:
    by: str  # the instance whose checkpoint names it
    at_seq: int  # that checkpoint's seq
    time: str
    seq: int
    digest: str


@dataclass
class DeploymentVerdict:
    """Every instance's verdict; ``ok`` only when all hold and every witnessed head is
    reached. ``records``/``problem`` read like a single trail's ``Verdict``."""

    instances: list[InstanceVerdict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def records(self) -> int:
        return sum(v.records for v in self.instances)

    @property
    def problem(self) -> str:
        return "; ".join(self.problems)


def _index_lines(engine: Engine) -> dict[str, list[tuple[int, bytes]]]:
    found: dict[str, list[tuple[int, bytes]]] = {}
    with engine.connect() as conn:
        rows = conn.execute(select(_lines.c.instance, _lines.c.seq, _lines.c.line)
                            .order_by(_lines.c.instance, _lines.c.seq))
        for row in rows:
            found.setdefault(str(row.instance), []).append(
                (int(row.seq), str(row.line).encode("ascii")))
    return found


def _hashes(lines: Iterable[bytes]) -> tuple[dict[int, str], int]:
    """seq -> the hash the next record chains to; and the seq a leading seal covers."""
    by_seq: dict[int, str] = {}
    sealed = 0
    for line in lines:
        body = parse_line(line)
        if body is None:
            continue
        body.pop("sig", None)
        try:
            seq = int(body["seq"])
            if body.get("kind") == "seal":
                by_seq[seq], sealed = str(body["sealed_last_hash"]), seq
            else:
                by_seq[seq] = record_hash(body)
        except (KeyError, TypeError, ValueError):
            continue
    return by_seq, sealed


def _witnesses(name: str, lines: list[bytes]) -> dict[str, list[Witness]]:
    """What the checkpoints in ``name``'s (verified) lines say of the others."""
    seen: dict[str, list[Witness]] = {}
    for line in lines:
        if b'"checkpoint"' not in line:
            continue
        body = parse_line(line)
        detail = body.get("detail") if body else None
        if not (body and body.get("kind") == CHECKPOINT_KIND and isinstance(detail, dict)):
            continue
        for key, value in detail.items():
            if not key.endswith(".seq"):
                continue
            other = key[:-4]
            try:
                seen.setdefault(other, []).append(Witness(
                    name, int(body["seq"]), str(body.get("time", "")), int(value),
                    str(detail.get(f"{other}.digest", ""))))
            except (TypeError, ValueError):
                continue
    return seen


def _chain_problem(name: str, lines: list[bytes], trail: AuditTrail, head: Head | None
                   ) -> tuple[int, str, int]:
    """Verify one instance's lines from the index: (records, problem, lines accepted)."""
    chain = Chain()
    first = parse_line(lines[0]) if lines else None
    verdict, consumed = scan(lines, chain, 0, 0, KeyPlan(trail.public_key, lines))
    if verdict is not None:
        return verdict.records, verdict.problem, consumed
    if first is not None and first.get("kind") != "seal" and first.get("seq") != 1:
        return chain.records, (f"its copy in the index starts at record {first.get('seq')}: "
                               "earlier records were removed"), consumed
    if head is not None:
        if chain.last_seq < head.seq:
            return chain.records, (f"its chain in the index ends at record {chain.last_seq} "
                                   f"but record {head.seq} was anchored: records were "
                                   "removed"), consumed
        if chain.last_seq == head.seq and chain.prev != head.digest:
            return chain.records, (f"record {head.seq} differs from the one anchored"), consumed
        if head.broken:
            return chain.records, head.broken, consumed
    return chain.records, "", consumed


def verify_all(trail: AuditTrail) -> DeploymentVerdict:
    """``audit verify``: this instance's file as always, then (shared index) every
    instance's chain from the index, this file against its copy, and every checkpoint's
    witnessed heads."""
    own = trail.verify()
    result = DeploymentVerdict()
    engine = trail.engine
    if not trail.copies or engine is None:
        result.instances.append(InstanceVerdict(trail.instance, own.ok, own.records,
                                                own.problem))
        if not own.ok:
            result.problems.append(own.problem)
        return result
    anchors = heads(engine)
    copies = _index_lines(engine)
    names = sorted(set(anchors) | set(copies) | {trail.instance})
    verified: dict[str, list[bytes]] = {}
    for name in names:
        rows = copies.get(name, [])
        lines = [line for _seq, line in rows]
        head = anchors.get(name)
        problems: list[str] = []
        records = 0
        if name == trail.instance:
            records = own.records
            if not own.ok:
                problems.append(f"its file: {own.problem}")
            if rows:
                problems += _file_against_copy(trail.path, dict(rows))
        if rows:
            count, problem, consumed = _chain_problem(name, lines, trail, head)
            records = records or count
            if problem:
                problems.append(problem if name != trail.instance else f"its copy: {problem}")
            verified[name] = lines[:consumed]
        elif head is not None and head.seq > 0 and name != trail.instance:
            problems.append(f"its records are not in the index (record {head.seq} was "
                            "anchored): they were removed, or it never wrote since it "
                            "joined a shared index")
        elif name == trail.instance:
            verified[name] = [line for _seq, line in lines_of(trail.path, 0, 1 << 62)]
        result.instances.append(InstanceVerdict(name, not problems, records,
                                                "; ".join(problems)))
        result.problems += [f"instance {name}: {p}" for p in problems]
    result.problems += _witnessed(verified)
    return result


def _file_against_copy(path: Path, copy: dict[int, bytes]) -> list[str]:
    for seq, line in lines_of(path, 0, 1 << 62):
        other = copy.get(seq)
        if other is not None and other != line:
            return [f"record {seq} differs between its file and its copy in the index"]
    return []


def _witnessed(verified: dict[str, list[bytes]]) -> list[str]:
    problems: list[str] = []
    claims: dict[str, list[Witness]] = {}
    for name, lines in verified.items():
        for other, seen in _witnesses(name, lines).items():
            claims.setdefault(other, []).extend(seen)
    for name, seen in sorted(claims.items()):
        chain_lines = verified.get(name)
        if chain_lines is None:
            problems.append(f"instance {name}: witnessed by {seen[0].by} but its chain is "
                            "not in the index")
            continue
        by_seq, sealed = _hashes(chain_lines)
        last = max(by_seq, default=0)
        for w in sorted(seen, key=lambda w: -w.seq):
            if w.seq == 0 or (w.seq < sealed):
                continue
            found = by_seq.get(w.seq)
            if found is None:
                problems.append(
                    f"instance {name}: its chain ends at record {last} but instance {w.by} "
                    f"witnessed its record {w.seq} (checkpoint {w.at_seq}, {w.time[:19]}): "
                    "records were removed")
                break
            if found != w.digest:
                problems.append(
                    f"instance {name}: record {w.seq} is not the one instance {w.by} "
                    f"witnessed (checkpoint {w.at_seq}, {w.time[:19]}): it was rewritten")
                break
    return problems


# --- reading every instance ----------------------------------------------------------


def _record(body: dict[str, Any], keys: TrailKeys, instance: str) -> Record:
    refs: dict[str, Any] = {}
    if "refs" in body:
        try:
            refs = unseal(keys, int(body["seq"]), body["refs"])
        except (InvalidTag, ValueError, KeyError, TypeError):
            refs = {}
    return Record(
        instance=instance, seq=int(body.get("seq", 0)), time=str(body.get("time", "")),
        kind=str(body.get("kind", "")), action=str(body.get("action", "")),
        outcome=str(body.get("outcome", "")), code=str(body.get("code", "")),
        actor_ae=str(body.get("ae", "")), actor_address=str(body.get("address", "")),
        actor_user=str(body.get("user", "")), message=str(body.get("message", "")),
        detail=dict(body.get("detail") or {}), refs=refs, raw=body,
    )


def merged_records(trail: AuditTrail) -> list[Record]:
    """Every instance's records by time (``audit show``): this instance's from its file,
    the others' from their copies in the index (their references unsealed with the same
    key: one vault, one master key). Integrity is ``verify_all``'s job."""
    own = list(trail.records())
    engine = trail.engine
    if not trail.copies or engine is None:
        return own
    merged = own
    for name, rows in _index_lines(engine).items():
        if name == trail.instance:
            continue
        for _seq, line in rows:
            body = parse_line(line)
            if body is not None:
                merged.append(_record(body, trail.keys, name))
    merged.sort(key=lambda r: (r.time, r.instance, r.seq))
    return merged


__all__ = [
    "CHECKPOINT_ACTION", "MAIN", "CheckpointRunner", "DeploymentVerdict", "InstanceVerdict",
    "checkpoint", "heads", "merged_records", "verify_all",
]
