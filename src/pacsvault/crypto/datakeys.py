"""Per-patient data keys and how they are wrapped.

Each patient gets their own random data key; destroying its wrapped copy makes every object
encrypted under it unreadable, wherever copies of the objects live (crypto-shredding).
The wrapping carries an algorithm byte so that a later "sealed" mode can wrap new data keys
to a public key (the server keeps receiving while the master key is locked away) without
changing how objects are encrypted.
"""

from __future__ import annotations

import secrets
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

WRAP_AESGCM_KEK_V1 = 1  # data key sealed with AES-256-GCM under the master-derived KEK
# Sealed mode: data key sealed with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
# HKDF-SHA256, AES-256-GCM) to the vault's sealed-mode public key. Made only while the
# master key is unavailable; re-wrapped as algorithm 1 when the archive is unsealed.
WRAP_HPKE_X25519_V1 = 2
_HPKE_INFO = b"pacsvault/v1/sealed-data-key:"


class DataKeyError(Exception):
    """A wrapped data key could not be opened with this vault's key."""


def new_data_key() -> tuple[uuid.UUID, bytes]:
    return uuid.uuid4(), secrets.token_bytes(32)


def wrap(kek: bytes, key_id: uuid.UUID, data_key: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(kek).encrypt(nonce, data_key, key_id.bytes)
    return bytes([WRAP_AESGCM_KEK_V1]) + nonce + sealed


def unwrap(kek: bytes, key_id: uuid.UUID, wrapped: bytes) -> bytes:
    if not wrapped or wrapped[0] != WRAP_AESGCM_KEK_V1:
        raise DataKeyError("unsupported data key wrapping")
    try:
        return AESGCM(kek).decrypt(wrapped[1:13], wrapped[13:], key_id.bytes)
    except InvalidTag:
        raise DataKeyError("data key does not open with this vault's key") from None


def _suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def wrap_sealed(public: X25519PublicKey, key_id: uuid.UUID, data_key: bytes) -> bytes:
    """Algorithm 2: only the holder of the sealed-mode private key (itself wrapped by the
    master key) opens it. The key id is bound through HPKE's ``info``."""
    return bytes([WRAP_HPKE_X25519_V1]) + _suite().encrypt(
        data_key, public, info=_HPKE_INFO + key_id.bytes)


def unwrap_sealed(private: X25519PrivateKey, key_id: uuid.UUID, wrapped: bytes) -> bytes:
    if not wrapped or wrapped[0] != WRAP_HPKE_X25519_V1:
        raise DataKeyError("not a sealed-mode data key")
    try:
        return _suite().decrypt(wrapped[1:], private, info=_HPKE_INFO + key_id.bytes)
    except Exception:  # InvalidTag or a malformed encapsulation
        raise DataKeyError("sealed data key does not open with this vault's key") from None
