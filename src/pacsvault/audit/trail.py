"""The tamper-evident audit trail: ``DATA/audit/trail.jsonl``.

One JSON record per line, append-only. Each record names the hash of the one before it
(``prev``) and carries an Ed25519 signature over its own hash, made with a key derived from
the master key: editing, deleting, reordering or forging records breaks the chain or a
signature, and re-hashing a forgery is useless without the key. Truncating the tail is
caught by the *head anchor* (last sequence number and hash) kept in the encrypted index.

Patient-identifying references (patient IDs, study and instance UIDs) are sealed in each
record with AES-256-GCM under a derived key; the rest (time, actor, action, outcome, event
code, counts) stays readable so an auditor can see the shape of activity without keys.

Retention replaces the oldest records by one signed ``seal`` record that keeps the hash of
the last removed record and a digest of the removed lines, so the chain still verifies.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit.events import AuditEvent
from pacsvault.index.models import AuditHead

FORMAT = "pacsvault-audit/1"
GENESIS = "0" * 64


class TrailError(Exception):
    """The trail cannot be written or read (message is user-facing)."""


@dataclass(frozen=True)
class TrailKeys:
    """Derived from the master key by the vault; never the master key itself."""

    signing_seed: bytes  # 32 bytes -> Ed25519 private key
    sealing_key: bytes  # 32 bytes -> AES-256-GCM for object references

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
    refs: dict[str, list[str]] = field(default_factory=dict)
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


class AuditTrail:
    def __init__(self, root: Path, keys: TrailKeys, sessions: sessionmaker[Session]) -> None:
        self.root = root
        self.path = root / "trail.jsonl"
        self._lockfile = root / "trail.lock"
        self._keys = keys
        self._public = keys.signer.public_key()
        self._sessions = sessions
        self._lock = threading.Lock()

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

    def _tail(self) -> tuple[int, str, str]:
        """(seq, hash to chain to, time) of the last record, read from the file itself.

        After a seal the chain continues from the last sealed record's hash. A damaged last
        line must not silence the trail: the chain goes on from the hash of its raw bytes
        (verification still reports the damaged line).
        """
        last = _last_line(self.path)
        if not last:
            return 0, GENESIS, ""
        try:
            body = json.loads(last)
            if not isinstance(body, dict):
                raise ValueError("not a record")
            body.pop("sig", None)
            if body.get("kind") == "seal":
                return int(body["seq"]), str(body["sealed_last_hash"]), str(body["time"])
            return int(body["seq"]), _hash(body), str(body["time"])
        except (ValueError, KeyError, TypeError):
            anchor = self._anchor()
            return (anchor[0] if anchor else 0), hashlib.sha256(last).hexdigest(), ""

    def _check_head(self, seq: int, digest: str) -> None:
        """Compare the file's tail with the anchor before moving it; flag a mismatch."""
        with self._sessions.begin() as session:
            head = session.get(AuditHead, 1)
            if head is None or head.broken:
                return
            if seq < head.seq:
                head.broken = (f"the trail ended at record {seq} when record {head.seq} had "
                               "been written: records were removed")
            elif seq == head.seq and digest != head.digest:
                head.broken = f"record {seq} differs from the one anchored in the index"

    def append(self, event: AuditEvent) -> int:
        refs = {
            "study_uids": list(event.study_uids),
            "sop_uids": list(event.sop_uids),
            "patient_ids": list(event.patient_ids),
        }
        with self._exclusive() as fd:
            seq, prev, last_time = self._tail()
            self._check_head(seq, prev)
            seq += 1
            now = event.time.astimezone(dt.UTC).isoformat(timespec="microseconds")
            time = max(now, last_time) if last_time else now  # monotonic order
            body: dict[str, Any] = {
                "v": FORMAT, "seq": seq, "prev": prev, "time": time, "kind": "event",
                "action": event.action, "outcome": event.outcome.name.lower(),
                "code": event.code.value, "ae": event.actor_ae,
                "address": event.actor_address, "user": event.actor_user,
                "message": event.message, "detail": dict(event.detail),
            }
            if any(refs.values()):
                body["refs"] = self._seal(seq, refs)
            self._write(fd, body)
        return seq

    def _write(self, fd: int, body: dict[str, Any]) -> None:
        digest = _hash(body)
        body["sig"] = base64.b64encode(self._keys.signer.sign(bytes.fromhex(digest))).decode()
        os.write(fd, _canonical(body) + b"\n")
        os.fsync(fd)
        self._set_anchor(int(body["seq"]), digest)

    def _set_anchor(self, seq: int, digest: str) -> None:
        with self._sessions.begin() as session:
            head = session.get(AuditHead, 1)
            if head is None:
                session.add(AuditHead(id=1, seq=seq, digest=digest))
            else:
                head.seq, head.digest = seq, digest

    def _anchor(self) -> tuple[int, str] | None:
        with self._sessions() as session:
            head = session.get(AuditHead, 1)
            return (head.seq, head.digest) if head else None

    def _broken(self) -> str:
        with self._sessions() as session:
            head = session.get(AuditHead, 1)
            return head.broken if head else ""

    def _seal(self, seq: int, refs: dict[str, list[str]]) -> str:
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._keys.sealing_key).encrypt(
            nonce, json.dumps(refs).encode(), f"{FORMAT}:{seq}".encode()
        )
        return base64.b64encode(nonce + sealed).decode()

    def _unseal(self, seq: int, blob: str) -> dict[str, list[str]]:
        raw = base64.b64decode(blob)
        plain = AESGCM(self._keys.sealing_key).decrypt(
            raw[:12], raw[12:], f"{FORMAT}:{seq}".encode()
        )
        value: dict[str, list[str]] = json.loads(plain)
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
                refs: dict[str, list[str]] = {}
                if "refs" in body:
                    try:
                        refs = self._unseal(int(body["seq"]), body["refs"])
                    except (InvalidTag, ValueError, KeyError):
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
        lines = self.path.read_bytes().splitlines()
        prev, last_seq, last_time = GENESIS, 0, ""
        check_from = max(0, len(lines) - tail) if tail else 0
        for index, line in enumerate(lines):
            number = index + 1
            try:
                body = json.loads(line)
                if not isinstance(body, dict):
                    raise ValueError("not a record")
                sig = base64.b64decode(body.pop("sig"))
                seq = int(body["seq"])
            except (ValueError, KeyError, TypeError, AttributeError):
                return Verdict(False, index, f"line {number} is not a valid record",
                               last_seq + 1, number)
            if body.get("v") != FORMAT:
                return Verdict(False, index, f"record {seq}: unknown format", seq, number)
            digest = _hash(body)
            if index >= check_from:
                try:
                    self._public.verify(sig, bytes.fromhex(digest))
                except InvalidSignature:
                    return Verdict(False, index, f"record {seq} (line {number}) was altered or "
                                   "forged: its signature does not match", seq, number)
            if body["kind"] == "seal" and index == 0:
                prev, last_seq = str(body["sealed_last_hash"]), seq
                last_time = str(body["time"])
                continue
            if seq != last_seq + 1:
                return Verdict(False, index, f"record {seq} (line {number}) is out of order: "
                               f"expected record {last_seq + 1} (records deleted or moved)",
                               seq, number)
            if body["prev"] != prev:
                return Verdict(False, index, f"record {seq} (line {number}) does not follow "
                               f"record {last_seq}: the chain is broken there", seq, number)
            if last_time and str(body["time"]) < last_time:
                return Verdict(False, index, f"record {seq} (line {number}) goes back in time",
                               seq, number)
            prev, last_seq, last_time = digest, seq, str(body["time"])
        anchor = self._anchor()
        if anchor is not None:
            anchor_seq, anchor_digest = anchor
            if last_seq < anchor_seq:
                return Verdict(False, len(lines), f"the trail ends at record {last_seq} but "
                               f"record {anchor_seq} was written: the tail was truncated",
                               last_seq + 1, len(lines) + 1)
            if last_seq == anchor_seq and prev != anchor_digest:
                return Verdict(False, len(lines), f"record {last_seq} differs from the one "
                               "anchored in the index", last_seq, len(lines))
        return Verdict(True, len(lines))

    # --- retention --------------------------------------------------------------------

    def purge_before(self, cutoff: dt.datetime, reason: str) -> int:
        """Replace records older than ``cutoff`` by one signed seal; returns how many."""
        cutoff_text = cutoff.astimezone(dt.UTC).isoformat(timespec="microseconds")
        with self._exclusive():
            lines = self.path.read_bytes().splitlines()
            old: list[bytes] = []
            for line in lines:
                body = json.loads(line)
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


def _last_line(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            block = b""
            pos = end
            while pos > 0:
                step = min(4096, pos)
                pos -= step
                fh.seek(pos)
                block = fh.read(step) + block
                stripped = block.rstrip(b"\n")
                if b"\n" in stripped:
                    return stripped.rsplit(b"\n", 1)[1]
            return block.rstrip(b"\n")
    except FileNotFoundError:
        return b""


class TrailSink:
    """Recorder sink writing every event to the trail."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def write(self, event: AuditEvent) -> None:
        self._trail.append(event)
