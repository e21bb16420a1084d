"""Column encryption for an index whose database cannot encrypt itself (issue 16).

SQLCipher encrypts the whole embedded index, so its columns hold plain values and SQL
compares them directly. PostgreSQL has no transparent encryption: a ``pg_dump`` would show
every name, ID, birth date and UID. So on any database other than SQLite, the columns that
identify a patient carry one of two column types, which pacsvault encrypts before a value
reaches the driver and decrypts after it comes back; on SQLite they are the plain types
they always were (same DDL, no migration):

- ``Sealed``: AES-256-GCM with a random nonce; reveals nothing but the length class (the
  value is padded to a multiple of ``PAD`` bytes first). Not
  comparable in SQL: matching on it happens in pacsvault after decryption, narrowed first
  by keyed blind tokens (``index.blind``).
- ``Fixed``: AES-256-SIV (deterministic authenticated encryption, RFC 5297) with the
  column's label as associated data. ``=``, ``IN`` and unique constraints work in SQL
  (the bound value is encrypted the same way); it reveals which rows share a value in that
  column (equality and frequency), never the value, and the same value in two columns
  gives two unrelated ciphertexts (padded alike, so lengths show only their class). Used
  for UIDs and identifiers that are matched exactly.

Keys: three keys derived from the master key under their own purposes (``crypto.keys``),
held by a ``Sealer`` attached to the engine's dialect (``attach``). A non-SQLite engine
without a sealer refuses to bind any value of these columns: a misconfigured engine can
fail, never write patient data in clear.

Blob layout (both types): one version byte (``1``) then, for ``Sealed``, the 12-byte nonce
and the GCM ciphertext+tag; for ``Fixed``, the SIV output (tag then ciphertext). The
plaintext under both is the UTF-8 value, one ``0x80`` byte and zero bytes up to a multiple
of ``PAD`` (ISO/IEC 7816-4 padding), so a dump shows a value's length only to ``PAD`` bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy import LargeBinary, String, Text
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.types import TypeDecorator, TypeEngine

from pacsvault.crypto import keys
from pacsvault.crypto.keys import MasterKey

_VERSION = b"\x01"
_NONCE = 12
TOKEN_BYTES = 16
PAD = 16


class SealedColumnError(Exception):
    """A sealed column could not be encrypted or opened (wrong key, altered row)."""


class Sealer:
    """The keys of one index's column encryption and the operations on them."""

    def __init__(self, column_key: bytes, fixed_key: bytes, token_key: bytes) -> None:
        if len(column_key) != 32 or len(fixed_key) != 64 or len(token_key) != 32:
            raise ValueError("sealer keys: 32, 64 and 32 bytes")
        self._gcm = AESGCM(column_key)
        self._siv = AESSIV(fixed_key)
        self._token_key = token_key
        self._previous: Sealer | None = None

    def reading_also(self, previous: Sealer) -> Sealer:
        """This sealer (binds, tokens) that also opens what ``previous`` sealed: the
        engine's sealer while a master key rotation re-encrypts the index row by row
        (``crypto.rotation.sealed_index``), so a read meeting a row of either key works.
        Never kept after the rotation: the old keys must open nothing then."""
        twin = Sealer.__new__(Sealer)
        twin._gcm, twin._siv, twin._token_key = self._gcm, self._siv, self._token_key
        twin._previous = previous
        return twin

    def seal(self, label: str, value: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._gcm.encrypt(nonce, _pad(value), _aad(label))

    def open(self, label: str, blob: bytes) -> str:
        if blob[:1] != _VERSION or len(blob) < 1 + _NONCE + 16:
            raise SealedColumnError(f"sealed column {label}: unknown format")
        try:
            plain = self._gcm.decrypt(blob[1:1 + _NONCE], blob[1 + _NONCE:], _aad(label))
        except InvalidTag:
            if self._previous is not None:
                return self._previous.open(label, blob)
            raise SealedColumnError(f"sealed column {label}: does not authenticate") from None
        return _unpad(label, plain)

    def fix(self, label: str, value: str) -> bytes:
        return _VERSION + self._siv.encrypt(_pad(value), [_aad(label)])

    def unfix(self, label: str, blob: bytes) -> str:
        if blob[:1] != _VERSION:
            raise SealedColumnError(f"fixed column {label}: unknown format")
        try:
            plain = self._siv.decrypt(blob[1:], [_aad(label)])
        except InvalidTag:
            if self._previous is not None:
                return self._previous.unfix(label, blob)
            raise SealedColumnError(f"fixed column {label}: does not authenticate") from None
        return _unpad(label, plain)

    def token(self, label: str, value: str) -> bytes:
        """A keyed blind token (HMAC-SHA-256, truncated to 128 bits) of ``value`` under
        ``label`` (which names the attribute *and* the kind of token: exact, prefix of n,
        month…), so equal inputs under equal labels give equal tokens and nothing else
        is comparable."""
        mac = hmac.new(self._token_key, _aad(label) + b"\x00" + value.encode("utf-8"),
                       hashlib.sha256)
        return mac.digest()[:TOKEN_BYTES]


def sealer_for(master: MasterKey, vault_id: str) -> Sealer:
    """The vault's column sealer: three keys derived from the master key (a rotation
    derives new ones and re-encrypts every sealed column: ``reseal``)."""
    return Sealer(master.derive(keys.PURPOSE_INDEX_COLUMNS, vault_id),
                  master.derive(keys.PURPOSE_INDEX_FIXED, vault_id, 64),
                  master.derive(keys.PURPOSE_INDEX_TOKENS, vault_id))


def reseal(old: Sealer, new: Sealer, label: str, blob: bytes, *,
           fixed: bool) -> tuple[bytes | None, str]:
    """One stored value moved from ``old``'s keys to ``new``'s (a master key rotation):
    ``(None, value)`` when it opens with ``new`` already (done by an interrupted run),
    else ``(new blob, value)``; ``SealedColumnError`` when neither key opens it. Both
    sealers must be plain ones (no ``reading_also``): which key a value is under is told
    by authentication, new first. ``fixed``: a ``Fixed`` column (SIV), else ``Sealed``
    or ``SealedTime`` (GCM, same blob)."""
    if fixed:
        try:
            return None, new.unfix(label, blob)
        except SealedColumnError:
            value = old.unfix(label, blob)
        return new.fix(label, value), value
    try:
        return None, new.open(label, blob)
    except SealedColumnError:
        value = old.open(label, blob)
    return new.seal(label, value), value


def _pad(value: str) -> bytes:
    raw = value.encode("utf-8") + b"\x80"
    return raw + b"\x00" * (-len(raw) % PAD)


def _unpad(label: str, plain: bytes) -> str:
    end = plain.rstrip(b"\x00")
    if not end.endswith(b"\x80"):
        raise SealedColumnError(f"column {label}: bad padding")
    return end[:-1].decode("utf-8")


def _aad(label: str) -> bytes:
    return b"pacsvault/index-column/1|" + label.encode("ascii")


def attach(engine: Engine, sealer: Sealer | None) -> None:
    """Give ``engine`` the sealer its column types use (None on SQLite: plain columns)."""
    engine.dialect.pv_sealer = sealer  # type: ignore[attr-defined]


def sealer_of(dialect: Dialect) -> Sealer | None:
    """The dialect's sealer; None means plain columns (SQLite, whole-file encryption).

    Any other database without a sealer is refused: writing there would put patient
    data in clear."""
    sealer: Sealer | None = getattr(dialect, "pv_sealer", None)
    if sealer is None and dialect.name != "sqlite":
        raise SealedColumnError(
            f"no column sealer on the {dialect.name} index: refusing to store patient "
            "data in clear")
    return sealer


def is_sealed(dialect: Dialect) -> bool:
    """Whether this index encrypts its columns (matching must then avoid SQL LIKE and
    ranges on them: ``index.blind``)."""
    return dialect.name != "sqlite"


class _Encrypted(TypeDecorator[str]):
    """Shared shape of the two column types: plain ``String``/``Text`` on SQLite,
    ``bytea`` elsewhere."""

    impl = Text
    cache_ok = True

    def __init__(self, label: str, length: int | None = None) -> None:
        super().__init__()
        self.label = label
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(self.length) if self.length else Text())
        return dialect.type_descriptor(LargeBinary())

    def _wrap(self, sealer: Sealer, value: str) -> bytes:
        raise NotImplementedError

    def _unwrap(self, sealer: Sealer, blob: bytes) -> str:
        raise NotImplementedError

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        sealer = sealer_of(dialect)
        if sealer is None or value is None:
            return value
        return self._wrap(sealer, str(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        sealer = sealer_of(dialect)
        if sealer is None or value is None:
            return value
        return self._unwrap(sealer, bytes(value))

    @property
    def python_type(self) -> type[str]:
        return str


class Sealed(_Encrypted):
    """Random AEAD: reveals nothing; not comparable in SQL (see module docstring)."""

    cache_ok = True

    def _wrap(self, sealer: Sealer, value: str) -> bytes:
        return sealer.seal(self.label, value)

    def _unwrap(self, sealer: Sealer, blob: bytes) -> str:
        return sealer.open(self.label, blob)


class Fixed(_Encrypted):
    """Deterministic AEAD: ``=``/``IN``/unique work in SQL; reveals equality only."""

    cache_ok = True

    def _wrap(self, sealer: Sealer, value: str) -> bytes:
        return sealer.fix(self.label, value)

    def _unwrap(self, sealer: Sealer, blob: bytes) -> str:
        return sealer.unfix(self.label, blob)
