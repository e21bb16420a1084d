"""The tamper-evident audit trail: ``DATA/audit/trail.jsonl``.

One JSON record per line, append-only. Each record names the hash of the one before it
(``prev``) and carries an Ed25519 signature over its own hash, made with a key derived from
the master key: editing, deleting, reordering or forging records breaks the chain or a
signature, and re-hashing a forgery is useless without the key. Truncating the tail is
caught by the *head anchor* (last sequence number and hash) kept in the encrypted index.

Patient-identifying references (patient IDs, study and instance UIDs) are sealed in each
record with AES-256-GCM under a derived key; the rest (time, actor, action, outcome, event
code, counts) stays readable so an auditor can see the shape of activity without keys.
Sealed references are grouped per patient (``patients``), so a patient's access request
can be answered with their own references only.

Retention replaces the oldest records by one signed ``seal`` record that keeps the hash of
the last removed record and a digest of the removed lines, so the chain still verifies.

This process never removes bytes from the file. A write cut short (disk full, crash) leaves
an incomplete last line; the next append (or ``pacsvault audit repair``) first writes a
signed ``repair`` record naming the length and SHA-256 of the bytes that were cut, and the
chain goes on from the last whole record. A record is *durable* only once its line is
written whole and fsync'ed: ``append`` raises otherwise, and the caller refuses the access.
"""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Connection, Engine, Table, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit.events import AuditEvent
from pacsvault.index.models import AuditHead, Instance, Patient, Series, Study

FORMAT = "pacsvault-audit/1"
GENESIS = "0" * 64

log = logging.getLogger("pacsvault.audit")

_heads = cast(Table, AuditHead.__table__)
_instances = cast(Table, Instance.__table__)
_series = cast(Table, Series.__table__)
_studies = cast(Table, Study.__table__)
_patients = cast(Table, Patient.__table__)


class TrailError(Exception):
    """The trail cannot be written or read (message is user-facing)."""


@dataclass(frozen=True)
class TrailKeys:
    """Derived from the master key by the vault; never the master key itself."""

    signing_seed: bytes  # 32 bytes -> Ed25519 private key
    sealing_key: bytes  # 32 bytes -> AES-256-GCM for object references
    # events keys of master keys rotated away (``crypto.rotation``): older records' refs
    retired_sealing: tuple[bytes, ...] = ()

    @property
    def signer(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.signing_seed)


@dataclass
class Record:
    """A decoded record (references decrypted when the keys allow)."""

    seq: int
    time: str
    kind: str
    action: str
    outcome: str
    code: str
    actor_ae: str
    actor_address: str
    actor_user: str
    message: str
    detail: dict[str, Any]
    refs: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    problem: str = ""
    first_bad_seq: int | None = None
    line: int | None = None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


class TrailUnwritable(TrailError):
    """A record could not be made durable (disk full, I/O error): refuse the access."""


@dataclass(frozen=True)
class _Tip:
    """The end of the file as an appender sees it."""

    seq: int  # last whole record's seq (0: none)
    chain: str  # hash the next record chains to
    time: str
    body: dict[str, Any] | None  # that record (without ``sig``)
    sig: bytes  # its signature
    region: bytes  # bytes after that record's line ("" when the file ends cleanly)
    needs_newline: bool  # the last record's line lacks its "\n"


@dataclass
class _Chain:
    """Where a verification stands after the lines it accepted."""

    prev: str = GENESIS
    last_seq: int = 0
    last_time: str = ""
    records: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """What the running server last verified: the first ``offset`` bytes (whole lines) had
    SHA-256 ``digest`` and ended the chain at ``chain``. The next check re-hashes that prefix
    (any edit, deletion or truncation changes it) and verifies only the lines after it."""

    offset: int
    lines: int
    digest: str
    chain: _Chain


ROTATED_ACTION = "keys.rotated"


def _public_of(value: object) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(value)))
    except ValueError:
        return None


def _raw_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class _KeyPlan:
    """Which public key verifies which line of the trail.

    A master key rotation (``crypto.rotation``) ends the old signing key's segment with a
    ``keys.rotated`` record, signed by the OLD key, naming the old and the new public
    keys. Trust starts from the vault's current key (derived from the master key) and goes
    backwards: the last rotation must name it as the new key, each earlier one the old key
    of the next. A rotation record naming any other key breaks verification at that
    record; the hash chain binds every older record to the newer ones.
    """

    def __init__(self, current: Ed25519PublicKey, lines: list[bytes]) -> None:
        self._current = current
        self._at: list[int] = []
        self._old: list[Ed25519PublicKey] = []
        self._named: list[str] = []
        for i, line in enumerate(lines):
            if ROTATED_ACTION.encode() not in line:
                continue
            body = _parse(line)
            detail = body.get("detail") if body else None
            if not (body and body.get("kind") == "event" and body.get("action") == ROTATED_ACTION
                    and isinstance(detail, dict)):
                continue
            old = _public_of(detail.get("old_signing_key"))
            if old is None:
                continue
            self._at.append(i)
            self._old.append(old)
            self._named.append(str(detail.get("new_signing_key", "")))
        self._problems: dict[int, str] = {}
        for k, index in enumerate(self._at):
            following = self._old[k + 1] if k + 1 < len(self._at) else current
            if self._named[k] != _raw_hex(following):
                self._problems[index] = ("a key rotation record that does not name the key "
                                         "signing the records after it (forged hand-over)")

    def problem(self, index: int) -> str:
        return self._problems.get(index, "")

    def key_at(self, index: int) -> Ed25519PublicKey:
        k = bisect.bisect_left(self._at, index)
        return self._old[k] if k < len(self._at) else self._current

    def verifies(self, index: int, sig: bytes, digest: str, *, seal: bool) -> bool:
        """A seal (retention) is signed with the key of the day it was written."""
        candidates = [*self._old, self._current] if seal else [self.key_at(index)]
        for key in candidates:
            try:
                key.verify(sig, bytes.fromhex(digest))
                return True
            except InvalidSignature:
                continue
        return False


def _identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(line)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class AuditTrail:
    def __init__(self, root: Path, keys: TrailKeys, sessions: sessionmaker[Session]) -> None:
        self.root = root
        self.path = root / "trail.jsonl"
        self._lockfile = root / "trail.lock"
        self._keys = keys
        self._public = keys.signer.public_key()
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        self._engine: Engine | None = bind if isinstance(bind, Engine) else None
        self._lock = threading.Lock()
        # (inode, size, mtime, ctime) of the file right after this process's last append,
        # and the tip it left: when the file is exactly as we left it (ctime cannot be set
        # back from user space), the next append skips re-reading and re-checking the tail.
        self._left: tuple[tuple[int, int, int, int], _Tip] | None = None
        # Called (outside the locks) with a description whenever an append finds the file
        # different from what was anchored: the running server's watcher raises the alert.
        self.on_problem: Callable[[str], None] | None = None

    # --- writing ----------------------------------------------------------------------

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    @contextmanager
    def _exclusive(self) -> Iterator[int]:
        """Thread lock + file lock: the server and CLI commands append to one trail.

        The lock is a separate file so that a retention rewrite (which replaces the trail
        file) cannot leave another process appending to the old one.
        """
        with self._lock:
            lock_fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    yield fd
                finally:
                    os.close(fd)
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)

    @contextmanager
    def _shared(self) -> Iterator[None]:
        """Readers that must not see a line half-written by another process."""
        with self._lock:
            lock_fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_SH)
                yield
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)

    @contextmanager
    def _db(self, conn: Connection | None) -> Iterator[Connection]:
        """The caller's transaction (a store batch), or a short one of our own."""
        if conn is not None:
            yield conn
            return
        assert self._engine is not None, "the trail needs a sessionmaker bound to an engine"
        with self._engine.begin() as own:
            yield own

    def _read_tip(self) -> _Tip:
        """The last whole record and whatever follows it, read backwards from the end.

        A line that is not JSON after the last record is the trace of a write that was cut
        (disk full, crash): it is the ``region`` a repair record will describe.
        """
        if not self.path.exists():
            return _Tip(0, GENESIS, "", None, b"", b"", False)
        with open(self.path, "rb") as fh:
            pos = fh.seek(0, os.SEEK_END)
            block = b""
            while True:
                step = min(65536, pos)
                pos -= step
                fh.seek(pos)
                block = fh.read(step) + block
                pieces = block.split(b"\n")
                lowest = 0 if pos == 0 else 1  # the first piece may be a partial line
                for i in range(len(pieces) - 1, lowest - 1, -1):
                    body = _parse(pieces[i])
                    if body is None:
                        continue
                    region = b"\n".join(pieces[i + 1:])
                    needs_newline = i == len(pieces) - 1
                    return self._tip_of(body, region, needs_newline)
                if pos == 0:
                    return _Tip(0, GENESIS, "", None, b"", block, False)

    def _tip_of(self, body: dict[str, Any], region: bytes, needs_newline: bool) -> _Tip:
        body = dict(body)
        sig_text = body.pop("sig", "")
        try:
            sig = base64.b64decode(str(sig_text))
            seq = int(body["seq"])
            seal = body.get("kind") == "seal"
            chain = str(body["sealed_last_hash"]) if seal else _hash(body)
            time = str(body["time"])
        except (ValueError, KeyError, TypeError):
            anchor = self._anchor()
            return _Tip(anchor[0] if anchor else 0, _hash(body), "", body, b"", region,
                        needs_newline)
        return _Tip(seq, chain, time, body, sig, region, needs_newline)

    def _signed(self, body: dict[str, Any] | None, sig: bytes) -> bool:
        if body is None:
            return True
        key = self._public
        detail = body.get("detail")
        if (body.get("action") == ROTATED_ACTION and isinstance(detail, dict)
                and detail.get("new_signing_key") == _raw_hex(self._public)):
            # the last record hands over to our key: signed by the key before it (the full
            # verification checks that key against the records before)
            key = _public_of(detail.get("old_signing_key")) or key
        try:
            key.verify(sig, bytes.fromhex(_hash(body)))
        except (InvalidSignature, ValueError):
            return False
        return True

    def _check_head(self, conn: Connection, tip: _Tip) -> str:
        """Compare the file's last record with the anchor and its signature; flag (once,
        for good) and return a mismatch."""
        head = conn.execute(select(_heads).where(_heads.c.id == 1)).first()
        if head is None or head.broken:
            return ""
        problem = ""
        if not self._signed(tip.body, tip.sig):
            problem = (f"record {tip.seq}, the last one in the file, was altered or forged: "
                       "its signature does not match")
        elif tip.seq < head.seq:
            problem = (f"the trail ended at record {tip.seq} when record {head.seq} had "
                       "been written: records were removed")
        elif tip.seq == head.seq and tip.chain != head.digest:
            problem = f"record {tip.seq} differs from the one anchored in the index"
        if problem:
            conn.execute(update(_heads).where(_heads.c.id == 1).values(broken=problem))
        return problem

    def _repair_body(self, conn: Connection, tip: _Tip, seq: int, time: str) -> dict[str, Any]:
        cut = tip.region[:-1] if tip.region.endswith(b"\n") else tip.region
        head = conn.execute(select(_heads.c.seq).where(_heads.c.id == 1)).first()
        anchored = int(head.seq) if head is not None else 0
        lost = max(0, anchored - tip.seq)
        message = ("a write to the trail was cut short (disk full, I/O error or crash); the "
                   "incomplete bytes were left in place and are described here")
        if lost:
            message += (f"; record {anchored} had been written: {lost} whole record(s) are "
                        "missing, which is not a cut write")
        return {
            "v": FORMAT, "seq": seq, "prev": tip.chain, "time": time, "kind": "repair",
            "action": "audit.repair", "outcome": "success" if not lost else "major_failure",
            "code": "110100", "ae": "", "address": "", "user": "", "message": message,
            "detail": {"cut_bytes": len(cut), "cut_sha256": hashlib.sha256(cut).hexdigest(),
                       "cut_lines": cut.count(b"\n") + 1, "after_seq": tip.seq,
                       "anchored_seq": anchored, "records_lost": lost},
        }

    def _append_locked(
        self, fd: int, events: list[tuple[AuditEvent, dict[str, Any]]],
        conn: Connection | None, problems: list[str], *, repair_only: bool = False,
    ) -> list[int]:
        """Write a repair record if the tail is torn, then ``events``; one fsync.

        Raises ``TrailUnwritable`` unless every line is written and fsync'ed; the anchor
        moves only after that.
        """
        left, self._left = self._left, None
        here = _identity(fd)
        mine = left is not None and left[0] == here
        tip = left[1] if left is not None and mine else self._read_tip()
        lines: list[bytes] = []
        seqs: list[int] = []
        seq, prev, last_time = tip.seq, tip.chain, tip.time
        with self._db(conn) as db:
            problem = "" if mine else self._check_head(db, tip)
            if problem:
                problems.append(problem)
            prefix = b"\n" if tip.needs_newline else b""
            if tip.region:
                if not tip.region.endswith(b"\n"):
                    prefix = b"\n"
                seq += 1
                now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
                time = max(now, last_time) if last_time else now
                body = self._repair_body(db, tip, seq, time)
                prev, last_time = self._sign(body), time
                lines.append(_canonical(body) + b"\n")
                seqs.append(seq)
            if repair_only and not lines:
                return []
            for event, refs in events:
                seq += 1
                now = event.time.astimezone(dt.UTC).isoformat(timespec="microseconds")
                time = max(now, last_time) if last_time else now  # monotonic order
                body = {
                    "v": FORMAT, "seq": seq, "prev": prev, "time": time, "kind": "event",
                    "action": event.action, "outcome": event.outcome.name.lower(),
                    "code": event.code.value, "ae": event.actor_ae,
                    "address": event.actor_address, "user": event.actor_user,
                    "message": event.message, "detail": dict(event.detail),
                }
                if refs:
                    body["refs"] = self._seal(seq, refs)
                prev, last_time = self._sign(body), time
                lines.append(_canonical(body) + b"\n")
                seqs.append(seq)
            self._write_all(fd, prefix + b"".join(lines))
            try:
                self._set_anchor(db, seq, prev)
            except Exception as exc:
                if conn is not None:
                    raise
                # The lines are durable: the access is recorded. Only truncation detection
                # lags until the next append moves the anchor.
                log.error("the audit anchor could not be updated (%s)", type(exc).__name__)
        self._left = (_identity(fd), _Tip(seq, prev, last_time, None, b"", b"", False))
        return seqs

    def _sign(self, body: dict[str, Any]) -> str:
        """Add ``sig``; returns the record's hash (what the next one chains to)."""
        digest = _hash(body)
        body["sig"] = base64.b64encode(self._keys.signer.sign(bytes.fromhex(digest))).decode()
        return digest

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise TrailUnwritable(f"the audit trail could not be written ({name})") from exc

    def _notify(self, problems: list[str]) -> None:
        callback = self.on_problem
        for problem in problems:
            log.critical("audit trail: %s", problem)
            if callback is not None:
                try:
                    callback(problem)
                except Exception as exc:  # the watcher must not break an append
                    log.error("audit watcher callback failed: %s", type(exc).__name__)

    def append(self, event: AuditEvent) -> int:
        """Append one record; returns its seq once it is durable (raises otherwise)."""
        refs = self._refs(event, None)
        problems: list[str] = []
        try:
            with self._exclusive() as fd:
                seqs = self._append_locked(fd, [(event, refs)], None, problems)
        finally:
            self._notify(problems)
        return seqs[-1]

    @contextmanager
    def batch(self) -> Iterator[BatchWriter]:
        """Hold the trail for a caller's index transaction (lock order: trail, then index).

        The store path writes its batch record through the yielded writer inside the same
        transaction as the index rows, so the anchor commits with them.
        """
        writer = BatchWriter(self)
        try:
            with self._exclusive() as fd:
                writer._fd = fd
                yield writer
                writer._fd = None
        finally:
            self._notify(writer.problems)

    def repair(self) -> Record | None:
        """Describe a torn tail with a signed repair record; None if the tail is whole."""
        problems: list[str] = []
        try:
            with self._exclusive() as fd:
                seqs = self._append_locked(fd, [], None, problems, repair_only=True)
        finally:
            self._notify(problems)
        if not seqs:
            return None
        for rec in self.records():
            if rec.seq == seqs[0] and rec.kind == "repair":
                return rec
        return None

    @property
    def keys(self) -> TrailKeys:
        return self._keys

    def rotate_keys(self, keys: TrailKeys, event: AuditEvent | None,
                    before: Callable[[], None] | None = None) -> int | None:
        """Master key rotation: holding the trail (no other append in between), run
        ``before`` (the index is re-keyed there: the anchor lives in it), append ``event``
        (``keys.rotated``, naming the new public key) signed by the CURRENT key, then sign
        with ``keys`` from the next record on. ``event`` None: already written by an
        interrupted run, only the keys change."""
        problems: list[str] = []
        seq: int | None = None
        try:
            with self._exclusive() as fd:
                if before is not None:
                    before()
                if event is not None:
                    seq = self._append_locked(fd, [(event, {})], None, problems)[-1]
                self._keys = keys
                self._public = keys.signer.public_key()
        finally:
            self._notify(problems)
        return seq

    def _set_anchor(self, conn: Connection, seq: int, digest: str) -> None:
        changed = conn.execute(
            update(_heads).where(_heads.c.id == 1).values(seq=seq, digest=digest))
        if not changed.rowcount:
            conn.execute(insert(_heads).values(id=1, seq=seq, digest=digest, broken=""))

    def _anchor(self) -> tuple[int, str] | None:
        with self._sessions() as session:
            head = session.get(AuditHead, 1)
            return (head.seq, head.digest) if head else None

    def broken(self) -> str:
        """The anchor's damage flag ("" while none was found)."""
        return self._broken()

    def _broken(self) -> str:
        with self._sessions() as session:
            head = session.get(AuditHead, 1)
            return head.broken if head else ""

    # --- references -------------------------------------------------------------------

    def _refs(self, event: AuditEvent, conn: Connection | None) -> dict[str, Any]:
        """The sealed references, grouped per patient.

        The producer may say which patient each study (and which study each instance)
        belongs to; anything it did not say is looked up in the index. What the index does
        not know either stays ``unassigned``: shown to no patient's access request.
        """
        refs: dict[str, Any] = {
            "study_uids": list(event.study_uids),
            "sop_uids": list(event.sop_uids),
            "patient_ids": list(event.patient_ids),
        }
        if not any(refs.values()):
            return {}
        study_patient = dict(event.study_patients)
        sop_study = dict(event.sop_studies)
        missing_sops = [s for s in event.sop_uids if s not in sop_study]
        try:
            if missing_sops or any(s not in study_patient for s in event.study_uids):
                if conn is not None:
                    self._lookup(conn, study_patient, sop_study, missing_sops,
                                 list(event.study_uids))
                elif self._engine is not None:
                    with self._engine.connect() as own:
                        self._lookup(own, study_patient, sop_study, missing_sops,
                                     list(event.study_uids))
        except Exception as exc:  # grouping is a convenience; the flat lists are kept
            log.error("audit references could not be grouped (%s)", type(exc).__name__)
        patients: dict[str, dict[str, list[str]]] = {
            p: {"study_uids": [], "sop_uids": []} for p in event.patient_ids}
        unassigned: dict[str, list[str]] = {"study_uids": [], "sop_uids": []}
        for study in event.study_uids:
            owner = study_patient.get(study)
            target = unassigned if owner is None else patients.setdefault(
                owner, {"study_uids": [], "sop_uids": []})
            target["study_uids"].append(study)
        for sop in event.sop_uids:
            owner = study_patient.get(sop_study.get(sop, ""))
            target = unassigned if owner is None else patients.setdefault(
                owner, {"study_uids": [], "sop_uids": []})
            target["sop_uids"].append(sop)
        refs["patients"] = patients
        if any(unassigned.values()):
            refs["unassigned"] = unassigned
        return refs

    @staticmethod
    def _lookup(conn: Connection, study_patient: dict[str, str], sop_study: dict[str, str],
                sops: list[str], studies: list[str]) -> None:
        for start in range(0, len(sops), 500):
            chunk = sops[start:start + 500]
            rows = conn.execute(
                select(_instances.c.sop_uid, _studies.c.study_uid)
                .join(_series, _instances.c.series_pk == _series.c.pk)
                .join(_studies, _series.c.study_pk == _studies.c.pk)
                .where(_instances.c.sop_uid.in_(chunk)))
            for sop, study in rows:
                sop_study[str(sop)] = str(study)
        wanted = sorted({*studies, *sop_study.values()} - set(study_patient))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            rows = conn.execute(
                select(_studies.c.study_uid, _patients.c.patient_id)
                .join(_patients, _studies.c.patient_pk == _patients.c.pk)
                .where(_studies.c.study_uid.in_(chunk)))
            for study, patient in rows:
                study_patient[str(study)] = str(patient)

    def _seal(self, seq: int, refs: dict[str, Any]) -> str:
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._keys.sealing_key).encrypt(
            nonce, json.dumps(refs).encode(), f"{FORMAT}:{seq}".encode()
        )
        return base64.b64encode(nonce + sealed).decode()

    def _unseal(self, seq: int, blob: str) -> dict[str, Any]:
        raw = base64.b64decode(blob)
        for key in (self._keys.sealing_key, *self._keys.retired_sealing):
            try:  # records sealed before a key rotation: the old events keys
                plain = AESGCM(key).decrypt(raw[:12], raw[12:], f"{FORMAT}:{seq}".encode())
                break
            except InvalidTag:
                continue
        else:
            raise InvalidTag()
        value: dict[str, Any] = json.loads(plain)
        return value

    # --- reading ----------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """Every record, references decrypted (integrity is ``verify``'s job)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                try:
                    body = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(body, dict):
                    continue
                refs: dict[str, Any] = {}
                if "refs" in body:
                    try:
                        refs = self._unseal(int(body["seq"]), body["refs"])
                    except (InvalidTag, ValueError, KeyError, TypeError):
                        refs = {}
                yield Record(
                    seq=int(body.get("seq", 0)), time=str(body.get("time", "")),
                    kind=str(body.get("kind", "")), action=str(body.get("action", "")),
                    outcome=str(body.get("outcome", "")), code=str(body.get("code", "")),
                    actor_ae=str(body.get("ae", "")), actor_address=str(body.get("address", "")),
                    actor_user=str(body.get("user", "")), message=str(body.get("message", "")),
                    detail=dict(body.get("detail") or {}), refs=refs, raw=body,
                )

    # --- verification -----------------------------------------------------------------

    def verify(self, *, tail: int | None = None) -> Verdict:
        """Check the chain, signatures, order and head anchor; name the first bad record.

        ``tail`` limits the signature checks to the last N records (fast check at start);
        the chain itself is always followed from the beginning (hashing is cheap).
        """
        broken = self._broken()
        if broken:
            return Verdict(False, 0, f"{broken} (detected when the next event was written)")
        if not self.path.exists():
            if self._anchor() is None:
                return Verdict(True, 0)  # a new vault: nothing written yet
            return Verdict(False, 0, "the audit trail file is missing", 1, 1)
        public = self._public  # (a rotation in this process swaps it: see ``check``)
        lines = self.path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        check_from = max(0, len(lines) - tail) if tail else 0
        chain = _Chain()
        verdict, consumed = self._scan(lines, chain, 0, check_from, _KeyPlan(public, lines))
        if verdict is not None:
            return verdict
        if consumed < len(lines):
            number = consumed + 1
            return Verdict(False, chain.records,
                           f"line {number} is not a valid record: an incomplete write (disk "
                           "full, crash) with no repair record after it; 'pacsvault audit "
                           "repair' records what was cut", chain.last_seq + 1, number)
        return self._against_anchor(chain, len(lines)) or Verdict(True, chain.records)

    def _against_anchor(self, chain: _Chain, lines: int) -> Verdict | None:
        anchor = self._anchor()
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

    def _scan(
        self, lines: list[bytes], chain: _Chain, first: int, check_from: int,
        plan: _KeyPlan | None = None,
    ) -> tuple[Verdict | None, int]:
        """Follow ``lines`` (global line index ``first`` onwards), updating ``chain``.

        Returns (the first problem, or None; how many lines were accepted). Lines that are
        not records are accepted only when a repair record right after them describes them
        exactly; a run of them at the very end is left unaccepted (a torn tail).
        """
        if plan is None:  # ``lines`` is the whole file
            plan = _KeyPlan(self._public, lines)
        i = 0
        while i < len(lines):
            index = first + i
            number = index + 1
            body = _parse(lines[i])
            if body is None:
                k = i
                while k < len(lines) and _parse(lines[k]) is None:
                    k += 1
                if k == len(lines):
                    return None, i
                cut = b"\n".join(lines[i:k])
                repair = _parse(lines[k]) or {}
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
            digest = _hash(body)
            if plan.problem(index):
                return Verdict(False, chain.records, f"record {seq} (line {number}) is "
                               f"{plan.problem(index)}", seq, number), i
            if index >= check_from and not plan.verifies(index, sig, digest,
                                                         seal=body.get("kind") == "seal"):
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

    def _chain_at_end(self, lines: list[bytes]) -> _Chain:
        for line in reversed(lines):
            body = _parse(line)
            if body is not None:
                tip = self._tip_of(body, b"", False)
                return _Chain(tip.chain, tip.seq, tip.time, len(lines))
        return _Chain()

    def check(self, since: Checkpoint | None, *, tail: int | None = None
              ) -> tuple[Checkpoint, str]:
        """The running server's check: (new checkpoint, problem or "").

        The prefix verified last time is re-hashed; only lines after it are verified. A
        changed prefix (an edit, a deleted line, a purge rewriting the file) gets a full
        verification: a purge passes it, tampering does not. The end is compared with the
        anchor (a removed tail), and the anchor's broken flag is reported.
        """
        with self._shared():
            public = self._public  # the key matching what was read (a rotation swaps it)
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                data = None
        broken = self._broken()
        if data is None:
            empty = Checkpoint(0, 0, hashlib.sha256(b"").hexdigest(), _Chain())
            if self._anchor() is None:
                return empty, broken
            return empty, broken or "the audit trail file is missing"
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1] if end else []
        problem = ""
        if (since is not None and since.offset <= end
                and hashlib.sha256(data[:since.offset]).hexdigest() == since.digest):
            chain = _Chain(**vars(since.chain))
            verdict, consumed = self._scan(lines[since.lines:], chain, since.lines,
                                           since.lines, _KeyPlan(public, lines))
            consumed += since.lines
        else:
            chain = _Chain()
            check_from = max(0, len(lines) - tail) if tail and since is None else 0
            verdict, consumed = self._scan(lines, chain, 0, check_from, _KeyPlan(public, lines))
        if verdict is not None:
            problem = verdict.problem
            # Report once: later checks follow on from the file's last record.
            consumed = len(lines)
            chain = self._chain_at_end(lines)
        else:
            late = self._against_anchor(chain, consumed) if consumed == len(lines) else None
            if late is not None:
                problem = late.problem
        offset = sum(len(line) + 1 for line in lines[:consumed])
        point = Checkpoint(offset, consumed, hashlib.sha256(data[:offset]).hexdigest(), chain)
        return point, problem or broken

    # --- retention --------------------------------------------------------------------

    def purge_before(self, cutoff: dt.datetime, reason: str) -> int:
        """Replace records older than ``cutoff`` by one signed seal; returns how many."""
        cutoff_text = cutoff.astimezone(dt.UTC).isoformat(timespec="microseconds")
        with self._exclusive():
            lines = self.path.read_bytes().splitlines()
            old: list[bytes] = []
            for line in lines:
                body = _parse(line)
                if body is None:
                    break  # a torn run stays, with the repair record that describes it
                if body.get("kind") == "seal" or str(body["time"]) < cutoff_text:
                    old.append(line)
                else:
                    break
            purged = [ln for ln in old if json.loads(ln).get("kind") != "seal"]
            if not purged:
                return 0
            last = json.loads(old[-1])
            last.pop("sig")
            first = json.loads(old[0])
            earlier = first["detail"] if first.get("kind") == "seal" else {}
            seal: dict[str, Any] = {
                "v": FORMAT, "seq": int(last["seq"]), "prev": GENESIS,
                "time": str(last["time"]), "kind": "seal", "action": "audit.retention",
                "outcome": "success", "code": "110101", "ae": "", "address": "", "user": "",
                "message": reason,
                "detail": {
                    "sealed_records": len(purged) + int(earlier.get("sealed_records", 0)),
                    "first_sealed_seq": int(earlier.get("first_sealed_seq", first["seq"])),
                },
                "sealed_last_hash": (
                    str(last["sealed_last_hash"]) if last.get("kind") == "seal" else _hash(last)
                ),
                "sealed_digest": hashlib.sha256(b"\n".join(old)).hexdigest(),
            }
            seal["sig"] = base64.b64encode(
                self._keys.signer.sign(bytes.fromhex(_hash(seal)))).decode()
            rest = lines[len(old):]
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\n".join([_canonical(seal), *rest]) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return len(purged)


class BatchWriter:
    """Appends records while the trail is held by ``AuditTrail.batch``."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail
        self._fd: int | None = None
        self.problems: list[str] = []

    def write(self, conn: Connection, events: list[AuditEvent]) -> list[int]:
        """Durably append ``events``, moving the anchor inside ``conn``'s transaction."""
        if self._fd is None:
            raise TrailError("the trail is not held")
        pairs = [(event, self._trail._refs(event, conn)) for event in events]
        return self._trail._append_locked(self._fd, pairs, conn, self.problems)


class TrailSink:
    """Recorder sink writing every event to the trail. ``durable``: a failure to write
    here means the event is not recorded, and an access depending on it is refused."""

    durable = True

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def write(self, event: AuditEvent) -> None:
        self._trail.append(event)
