"""The trail's record format: what one line of ``DATA/audit/trail.jsonl`` is and how it is
hashed, signed and chained, shared by the appender (``trail``), the verifier
(``trail_verify``) and the retention rewrite (``trail_retention``).

Why one module: the canonical encoding, the hash a record chains to and the rule saying
which key signed which line must be exactly the same for writing and for checking; a
second copy would let a writer produce records its own verifier rejects.
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

FORMAT = "pacsvault-audit/1"
GENESIS = "0" * 64
ROTATED_ACTION = "keys.rotated"


class TrailError(Exception):
    """The trail cannot be written or read (message is user-facing)."""


class TrailUnwritable(TrailError):
    """A record could not be made durable (disk full, I/O error): refuse the access."""


@dataclass(frozen=True)
class TrailKeys:
    """Derived from the master key by the vault; never the master key itself."""

    signing_seed: bytes  # 32 bytes -> Ed25519 private key
    sealing_key: bytes  # 32 bytes -> AES-256-GCM for object references
    # events keys of master keys rotated away (``crypto.rotation``): older records' refs
    retired_sealing: tuple[bytes, ...] = ()

    @functools.cached_property
    def signer(self) -> Ed25519PrivateKey:
        """Made once per set of keys (a rotation makes a new ``TrailKeys``): deriving the
        key from its seed cost as much as the signature itself, on every record (issue
        17: one store record per committed batch, one per query)."""
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
    instance: str = ""  # the instance whose chain holds it (several data directories)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    problem: str = ""
    first_bad_seq: int | None = None
    line: int | None = None


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def signed_line(body: dict[str, Any], sign: Callable[[bytes], bytes]) -> tuple[str, bytes]:
    """Sign ``body`` (no ``sig`` yet): adds ``sig``, returns its hash (``record_hash``,
    what the next record chains to) and its line, ``canonical`` of the signed body.

    Why: hashing the body and then encoding it again with its signature encoded every
    record twice (issue 17: once per stored batch). The top-level keys are sorted, so
    the body is encoded as the keys before ``sig`` and those after it; the hashed bytes
    and the line are joined from those two encodings, byte for byte ``canonical``'s.
    """
    head = {k: v for k, v in body.items() if k < "sig"}
    tail = {k: v for k, v in body.items() if k > "sig"}
    if not head or not tail or len(head) + len(tail) != len(body):
        digest = record_hash(body)
        body["sig"] = base64.b64encode(sign(bytes.fromhex(digest))).decode()
        return digest, canonical(body)
    before, after = canonical(head)[:-1], canonical(tail)[1:]
    digest = hashlib.sha256(before + b"," + after).hexdigest()
    sig = base64.b64encode(sign(bytes.fromhex(digest)))
    body["sig"] = sig.decode()
    return digest, b"".join((before, b',"sig":"', sig, b'",', after))


def parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(line)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class Tip:
    """The end of the file as an appender sees it."""

    seq: int  # last whole record's seq (0: none)
    chain: str  # hash the next record chains to
    time: str
    body: dict[str, Any] | None  # that record (without ``sig``)
    sig: bytes  # its signature
    region: bytes  # bytes after that record's line ("" when the file ends cleanly)
    needs_newline: bool  # the last record's line lacks its "\n"


def tip_of(body: dict[str, Any], region: bytes, needs_newline: bool,
           anchor: Callable[[], tuple[int, str] | None]) -> Tip:
    """The tip a record leaves; ``anchor`` gives the seq to go on from when the record is
    too damaged to say its own."""
    body = dict(body)
    sig_text = body.pop("sig", "")
    try:
        sig = base64.b64decode(str(sig_text))
        seq = int(body["seq"])
        seal = body.get("kind") == "seal"
        chain = str(body["sealed_last_hash"]) if seal else record_hash(body)
        time = str(body["time"])
    except (ValueError, KeyError, TypeError):
        anchored = anchor()
        return Tip(anchored[0] if anchored else 0, record_hash(body), "", body, b"", region,
                   needs_newline)
    return Tip(seq, chain, time, body, sig, region, needs_newline)


@dataclass
class Chain:
    """Where a verification stands after the lines it accepted."""

    prev: str = GENESIS
    last_seq: int = 0
    last_time: str = ""
    records: int = 0


def public_of(value: object) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(value)))
    except ValueError:
        return None


def raw_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class KeyPlan:
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
            body = parse_line(line)
            detail = body.get("detail") if body else None
            if not (body and body.get("kind") == "event" and body.get("action") == ROTATED_ACTION
                    and isinstance(detail, dict)):
                continue
            old = public_of(detail.get("old_signing_key"))
            if old is None:
                continue
            self._at.append(i)
            self._old.append(old)
            self._named.append(str(detail.get("new_signing_key", "")))
        self._problems: dict[int, str] = {}
        for k, index in enumerate(self._at):
            following = self._old[k + 1] if k + 1 < len(self._at) else current
            if self._named[k] != raw_hex(following):
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
