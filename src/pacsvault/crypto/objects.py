"""The authenticated on-disk object format, ``pacsvault-obj/1`` (see ARCHITECTURE.md).

Modelled on the age payload: a per-object random salt turns the long-lived data key into a
one-off payload key (HKDF), so chunk nonces can be plain counters without any nonce-reuse
risk, and a "last chunk" flag in the nonce makes truncation detectable. The object's
identity (its SOP Instance UID) is bound as associated data, so an attacker with write access
cannot swap two files and have the index serve the wrong image.
"""

from __future__ import annotations

import secrets
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"pacsvault-obj/1\n"
CHUNK_SIZE = 1 << 20
_TAG = 16
_HEADER = struct.Struct(">16s16s16sI")  # magic, key id, salt, chunk size
HEADER_SIZE = _HEADER.size
_MAX_CHUNK = 16 << 20
_PAYLOAD_INFO = b"pacsvault-obj/1 payload key"


class ObjectFormatError(Exception):
    """The bytes are not an intact pacsvault object for this identity and key."""


@dataclass(frozen=True)
class ObjectHeader:
    key_id: uuid.UUID
    salt: bytes
    chunk_size: int

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.key_id.bytes, self.salt, self.chunk_size)

    @classmethod
    def unpack(cls, blob: bytes) -> ObjectHeader:
        if len(blob) < HEADER_SIZE:
            raise ObjectFormatError("object shorter than its header")
        magic, key_id, salt, chunk_size = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise ObjectFormatError("not a pacsvault-obj/1 object")
        if not 0 < chunk_size <= _MAX_CHUNK:
            raise ObjectFormatError("invalid chunk size")
        return cls(uuid.UUID(bytes=key_id), salt, chunk_size)


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _payload_cipher(data_key: bytes, header: ObjectHeader) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=header.salt, info=_PAYLOAD_INFO
    ).derive(data_key)
    return AESGCM(key)


def _aad(header_bytes: bytes, identity: str) -> bytes:
    return header_bytes + identity.encode("utf-8")


def encrypt(
    plaintext: bytes | memoryview, data_key: bytes, key_id: uuid.UUID, identity: str
) -> Iterator[bytes]:
    """Yield the object's bytes piece by piece so a writer never holds two full copies."""
    header = ObjectHeader(key_id, secrets.token_bytes(16), CHUNK_SIZE)
    header_bytes = header.pack()
    yield header_bytes
    cipher = _payload_cipher(data_key, header)
    aad = _aad(header_bytes, identity)
    view = memoryview(plaintext)
    count = max(1, -(-len(view) // CHUNK_SIZE))
    for i in range(count):
        chunk = view[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
        yield cipher.encrypt(_nonce(i, i == count - 1), chunk, aad)


def read_header(blob: bytes) -> ObjectHeader:
    return ObjectHeader.unpack(blob)


def decrypt(blob: bytes, data_key: bytes, identity: str) -> bytes:
    """Return the plaintext, or raise if anything was altered, truncated, extended or swapped."""
    header = ObjectHeader.unpack(blob)
    cipher = _payload_cipher(data_key, header)
    aad = _aad(blob[:HEADER_SIZE], identity)
    step = header.chunk_size + _TAG
    body = memoryview(blob)[HEADER_SIZE:]
    if len(body) < _TAG:
        raise ObjectFormatError("object truncated")
    count = max(1, -(-len(body) // step))
    try:
        # memoryview slices: no copy of the ciphertext; one join for several chunks
        pieces = [
            cipher.decrypt(_nonce(i, i == count - 1), body[i * step : (i + 1) * step], aad)
            for i in range(count)
        ]
    except InvalidTag:
        raise ObjectFormatError(
            "object failed authentication (altered, truncated, or not this instance)"
        ) from None
    return pieces[0] if count == 1 else b"".join(pieces)
