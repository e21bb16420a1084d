"""Verifying the trail: the whole file on demand (``verify``: ``pacsvault audit verify``,
the start-up check) and the running server's periodic check (``check``, for
``audit/watch.py``).

Why apart from the appender: verification only reads. It needs five things of the trail
(``TrailView``), not its writing machinery, and reads the same format (``trail_format``)
with the same key plan the appender's records were signed under.
"""

from __future__ import annotations

import base64
import hashlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pacsvault.audit.trail_format import (
    FORMAT,
    ROTATED_ACTION,
    Chain,
    KeyPlan,
    Verdict,
    parse_line,
    raw_hex,
    record_hash,
    tip_of,
)


@dataclass(frozen=True)
class Checkpoint:
    """What the running server last verified: the first ``offset`` bytes (``lines`` whole
    lines) had SHA-256 ``digest`` and ended the chain at ``chain``.

    The next periodic check reads only what follows ``offset`` when the file is still the
    same inode, no shorter, still holds ``last_line`` right before ``offset`` and no key
    changed (``key``): the running digest (``hasher``) goes on over the new bytes. A file
    replaced (retention, restore), cut, or shifted (a line edited to another length or
    deleted) fails one of those and gets the full check: the prefix re-hashed against
    ``digest``, and a full verification if it differs. A same-length edit of an older
    line is found by the full check the watcher runs every few periods (``watch``).
    """

    offset: int
    lines: int
    digest: str
    chain: Chain
    inode: int = 0
    last_line: bytes = b""  # the last verified line, with its "\n"
    key: str = ""  # raw public key (hex) the lines were verified with
    hasher: hashlib._Hash | None = field(default=None, compare=False, repr=False)


class TrailView(Protocol):
    """What verification needs of ``AuditTrail``."""

    path: Path

    @property
    def public_key(self) -> Ed25519PublicKey: ...

    def anchor(self) -> tuple[int, str] | None: ...

    def broken(self) -> str: ...

    def shared(self) -> AbstractContextManager[None]: ...


def verify(trail: TrailView, *, tail: int | None = None) -> Verdict:
    """Check the chain, signatures, order and head anchor; name the first bad record.

    ``tail`` limits the signature checks to the last N records (fast check at start);
    the chain itself is always followed from the beginning (hashing is cheap).
    """
    broken = trail.broken()
    if broken:
        return Verdict(False, 0, f"{broken} (detected when the next event was written)")
    if not trail.path.exists():
        if trail.anchor() is None:
            return Verdict(True, 0)  # a new vault: nothing written yet
        return Verdict(False, 0, "the audit trail file is missing", 1, 1)
    public = trail.public_key  # (a rotation in this process swaps it: see ``check``)
    lines = trail.path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    check_from = max(0, len(lines) - tail) if tail else 0
    chain = Chain()
    verdict, consumed = scan(lines, chain, 0, check_from, KeyPlan(public, lines))
    if verdict is not None:
        return verdict
    if consumed < len(lines):
        number = consumed + 1
        return Verdict(False, chain.records,
                       f"line {number} is not a valid record: an incomplete write (disk "
                       "full, crash) with no repair record after it; 'pacsvault audit "
                       "repair' records what was cut", chain.last_seq + 1, number)
    return against_anchor(trail, chain, len(lines)) or Verdict(True, chain.records)


def against_anchor(trail: TrailView, chain: Chain, lines: int) -> Verdict | None:
    anchor = trail.anchor()
    if anchor is None:
        return None
    anchor_seq, anchor_digest = anchor
    if chain.last_seq < anchor_seq:
        return Verdict(False, chain.records, f"the trail ends at record {chain.last_seq} "
                       f"but record {anchor_seq} was written: the tail was truncated",
                       chain.last_seq + 1, lines + 1)
    if chain.last_seq == anchor_seq and chain.prev != anchor_digest:
        return Verdict(False, chain.records, f"record {chain.last_seq} differs from the "
                       "one anchored in the index", chain.last_seq, lines)
    return None


def scan(
    lines: list[bytes], chain: Chain, first: int, check_from: int, plan: KeyPlan,
    vouched: set[bytes] | None = None,
) -> tuple[Verdict | None, int]:
    """Follow ``lines`` (global line index ``first`` onwards), updating ``chain``.

    Returns (the first problem, or None; how many lines were accepted). Lines that are
    not records are accepted only when a repair record right after them describes them
    exactly; a run of them at the very end is left unaccepted (a torn tail).
    ``vouched``: see ``_ours``.
    """
    i = 0
    while i < len(lines):
        index = first + i
        number = index + 1
        body = parse_line(lines[i])
        if body is None:
            k = i
            while k < len(lines) and parse_line(lines[k]) is None:
                k += 1
            if k == len(lines):
                return None, i
            cut = b"\n".join(lines[i:k])
            repair = parse_line(lines[k]) or {}
            detail = repair.get("detail")
            if not (repair.get("kind") == "repair" and isinstance(detail, dict)
                    and detail.get("cut_bytes") == len(cut)
                    and detail.get("cut_sha256") == hashlib.sha256(cut).hexdigest()):
                return Verdict(False, chain.records, f"line {number} is not a valid record",
                               chain.last_seq + 1, number), i
            i = k
            continue
        try:
            sig = base64.b64decode(body.pop("sig"))
            seq = int(body["seq"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return Verdict(False, chain.records, f"line {number} is not a valid record",
                           chain.last_seq + 1, number), i
        if body.get("v") != FORMAT:
            return Verdict(False, chain.records, f"record {seq}: unknown format", seq,
                           number), i
        digest = record_hash(body)
        if plan.problem(index):
            return Verdict(False, chain.records, f"record {seq} (line {number}) is "
                           f"{plan.problem(index)}", seq, number), i
        if (index >= check_from and not _ours(vouched, lines[i])
                and not plan.verifies(index, sig, digest, seal=body.get("kind") == "seal")):
            return Verdict(False, chain.records, f"record {seq} (line {number}) was "
                           "altered or forged: its signature does not match", seq,
                           number), i
        try:
            if body["kind"] == "seal" and index == 0:
                chain.prev, chain.last_seq = str(body["sealed_last_hash"]), seq
                chain.last_time = str(body["time"])
                chain.records += 1
                i += 1
                continue
            if seq != chain.last_seq + 1:
                return Verdict(False, chain.records, f"record {seq} (line {number}) is out "
                               f"of order: expected record {chain.last_seq + 1} (records "
                               "deleted or moved)", seq, number), i
            if body["prev"] != chain.prev:
                return Verdict(False, chain.records, f"record {seq} (line {number}) does "
                               f"not follow record {chain.last_seq}: the chain is broken "
                               "there", seq, number), i
            if chain.last_time and str(body["time"]) < chain.last_time:
                return Verdict(False, chain.records, f"record {seq} (line {number}) goes "
                               "back in time", seq, number), i
            chain.prev, chain.last_seq, chain.last_time = digest, seq, str(body["time"])
        except (KeyError, TypeError):
            return Verdict(False, chain.records, f"line {number} is not a valid record",
                           chain.last_seq + 1, number), i
        chain.records += 1
        i += 1
    return None, len(lines)


def _ours(vouched: set[bytes] | None, line: bytes) -> bool:
    """Whether this process wrote exactly these bytes and signed them itself
    (``AuditTrail.vouched``: SHA-256 of each line it appended since the watcher last saw
    it, under the current key): the signature it made over them needs no Ed25519 check
    (issue 17: ~0.1 ms of CPU per record, one record per query). The line is taken out
    of the set. Its chain, order and time are checked as any other line's; a line edited
    since it was written has other bytes and is verified as before."""
    if not vouched:
        return False
    digest = hashlib.sha256(line).digest()
    if digest not in vouched:
        return False
    vouched.discard(digest)
    return True


def chain_at_end(trail: TrailView, lines: list[bytes]) -> Chain:
    for line in reversed(lines):
        body = parse_line(line)
        if body is not None:
            tip = tip_of(body, b"", False, trail.anchor)
            return Chain(tip.chain, tip.seq, tip.time, len(lines))
    return Chain()


def check(trail: TrailView, since: Checkpoint | None, *, tail: int | None = None,
          full: bool = False) -> tuple[Checkpoint, str]:
    """The running server's check: (new checkpoint, problem or "").

    Periodic (``full`` False): when ``since`` still describes the start of the file (see
    ``Checkpoint``), only the bytes appended since are read and verified. Otherwise, and
    when ``full``: the prefix verified last time is re-hashed; only lines after it are
    verified. A changed prefix (an edit, a deleted line, a purge rewriting the file) gets a
    full verification: a purge passes it, tampering does not. The end is compared with the
    anchor (a removed tail), and the anchor's broken flag is reported.
    """
    with trail.shared():
        public = trail.public_key  # the key matching what was read (a rotation swaps it)
        try:
            fh = open(trail.path, "rb")  # noqa: SIM115 (closed below, inside the lock)
        except FileNotFoundError:
            data, inode, appended = None, 0, None
        else:
            with fh:
                inode = os.fstat(fh.fileno()).st_ino
                appended = None if full else _appended(fh, inode, raw_hex(public), since)
                data = fh.read() if appended is None else None
    if since is not None and appended is not None:
        found = _check_appended(trail, since, appended)
        if found is not None:
            return found
        with trail.shared():  # a problem in the new lines: report it as a full check does
            public = trail.public_key
            with open(trail.path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                data = fh.read()
    broken = trail.broken()
    if data is None:
        empty = Checkpoint(0, 0, hashlib.sha256(b"").hexdigest(), Chain(), key=raw_hex(public),
                           hasher=hashlib.sha256())
        if trail.anchor() is None:
            return empty, broken
        return empty, broken or "the audit trail file is missing"
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1] if end else []
    problem = ""
    if (since is not None and since.offset <= end
            and hashlib.sha256(data[:since.offset]).hexdigest() == since.digest):
        chain = Chain(**vars(since.chain))
        verdict, consumed = scan(lines[since.lines:], chain, since.lines,
                                 since.lines, KeyPlan(public, lines), _vouched(trail))
        consumed += since.lines
    else:
        chain = Chain()
        check_from = max(0, len(lines) - tail) if tail and since is None else 0
        verdict, consumed = scan(lines, chain, 0, check_from, KeyPlan(public, lines),
                                 _vouched(trail))
    if verdict is not None:
        problem = verdict.problem
        # Report once: later checks follow on from the file's last record.
        consumed = len(lines)
        chain = chain_at_end(trail, lines)
    else:
        late = against_anchor(trail, chain, consumed) if consumed == len(lines) else None
        if late is not None:
            problem = late.problem
    offset = sum(len(line) + 1 for line in lines[:consumed])
    hasher = hashlib.sha256(data[:offset])
    point = Checkpoint(offset, consumed, hasher.hexdigest(), chain, inode,
                       lines[consumed - 1] + b"\n" if consumed else b"", raw_hex(public),
                       hasher)
    return point, problem or broken


def _vouched(trail: TrailView) -> set[bytes] | None:
    """The running server's own lines (``AuditTrail.vouched``), None for other views."""
    vouched = getattr(trail, "vouched", None)
    return vouched if isinstance(vouched, set) else None


def _appended(fh: BinaryIO, inode: int, key: str, since: Checkpoint | None) -> bytes | None:
    """The bytes after ``since.offset`` when the file still starts as it did (same inode
    and key, not shorter, the last verified line in place); None when a full check is due.
    Leaves ``fh`` at the start for a full read."""
    if since is None or since.hasher is None or since.inode != inode or since.key != key:
        return None
    size = os.fstat(fh.fileno()).st_size
    if size < since.offset:
        return None
    fh.seek(since.offset - len(since.last_line))
    if fh.read(len(since.last_line)) != since.last_line:
        fh.seek(0)
        return None
    appended = fh.read()
    if ROTATED_ACTION.encode() in appended or b'"kind":"seal"' in appended:
        fh.seek(0)  # a key hand-over or a seal: the key plan needs the whole file
        return None
    return appended


def _check_appended(trail: TrailView, since: Checkpoint, appended: bytes
                    ) -> tuple[Checkpoint, str] | None:
    """Verify only the lines appended since ``since``; None when they hold a problem (the
    caller then checks the whole file, which reports it the way it always has)."""
    assert since.hasher is not None
    end = appended.rfind(b"\n") + 1
    lines = appended[:end].split(b"\n")[:-1] if end else []
    chain = Chain(**vars(since.chain))
    # no rotation record among them (``_appended``): every line is the current key's
    verdict, consumed = scan(lines, chain, since.lines, since.lines,
                             KeyPlan(trail.public_key, []), _vouched(trail))
    if verdict is not None:
        return None
    if consumed == len(lines) and against_anchor(trail, chain, since.lines + consumed):
        return None
    size = sum(len(line) + 1 for line in lines[:consumed])
    hasher = since.hasher.copy()
    hasher.update(appended[:size])
    point = Checkpoint(since.offset + size, since.lines + consumed, hasher.hexdigest(), chain,
                       since.inode, lines[consumed - 1] + b"\n" if consumed else since.last_line,
                       since.key, hasher)
    return point, trail.broken()
