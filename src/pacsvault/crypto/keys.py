"""The master key, the keys derived from it, and the recovery code.

The master key is 32 random bytes kept in a key file *outside* the data directory, so that
a copy of the data directory alone (a stolen disk, a backup) opens nothing. Every other key
is either derived from it with HKDF under a fixed purpose label, or wrapped by such a key.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pacsvault.fsutil import write_durably

KEY_FILE_HEADER = "pacsvault-master-key/v1"
MASTER_KEY_BYTES = 32

# Purposes of derived keys. Changing a label changes the key: never edit, only add.
PURPOSE_INDEX = "pacsvault/v1/index-db"
PURPOSE_KEK = "pacsvault/v1/data-key-wrapping"
PURPOSE_CHECK = "pacsvault/v1/key-check"
PURPOSE_TLS = "pacsvault/v1/tls-private-keys"
PURPOSE_EVENTS = "pacsvault/v1/events"
PURPOSE_AUDIT_SIGNING = "pacsvault/v1/audit-signing"
PURPOSE_AUDIT_EXPORT = "pacsvault/v1/audit-export-queue"
PURPOSE_ACCOUNTS = "pacsvault/v1/account-secrets"
# column encryption of an index that cannot encrypt itself (PostgreSQL: index/sealing)
PURPOSE_INDEX_COLUMNS = "pacsvault/v1/index-columns"
PURPOSE_INDEX_FIXED = "pacsvault/v1/index-fixed-columns"
PURPOSE_INDEX_TOKENS = "pacsvault/v1/index-blind-tokens"

_CHECK_PLAINTEXT = b"pacsvault key check v1"
_SCRYPT_N = 2**15
_RECOVERY_GROUPS = 8


class VaultKeyError(Exception):
    """A key is missing, unreadable or does not open this vault (message is user-facing)."""


class KeyUnavailable(VaultKeyError):
    """The master key exists but cannot be had right now: its medium is absent (USB key
    removed) or it is protected and nobody has unlocked it yet. ``serve`` starts *sealed*
    on this (it keeps receiving), every other command stops with the message."""


@dataclass(frozen=True)
class MasterKey:
    """The root secret. Only ``derive`` should ever touch ``raw``."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != MASTER_KEY_BYTES:
            raise VaultKeyError("the master key must be 32 bytes")

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(MASTER_KEY_BYTES))

    def derive(self, purpose: str, vault_id: str, length: int = 32) -> bytes:
        """Derive an independent key for one purpose, bound to this vault."""
        return HKDF(
            algorithm=hashes.SHA256(),
            length=length,
            salt=vault_id.encode("ascii"),
            info=purpose.encode("ascii"),
        ).derive(self.raw)

    def __repr__(self) -> str:  # never print key material by accident
        return "MasterKey(<redacted>)"


def write_key_file(path: Path, key: MasterKey, vault_id: str) -> None:
    """Create the key file with mode 0600 from the start (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = f"{KEY_FILE_HEADER}\nvault={vault_id}\nkey={base64.b64encode(key.raw).decode()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_durably(fd, [body.encode("ascii")])
    finally:
        os.close(fd)


def check_key_file(path: Path) -> None:
    """Refuse a key file that is absent (its medium removed: say what to do) or that other
    users can read (a leaked key is a leaked vault). Every reader of a key file (v1 here,
    v1 and v2 in ``crypto.protection``) checks this first."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyUnavailable(
            f"key file not found: {path}. Insert the key medium, pass --key-file, "
            "or restore it with 'pacsvault key recover'."
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VaultKeyError(f"key file {path} is readable by other users; run: chmod 600 {path}")


def read_key_file(path: Path) -> tuple[MasterKey, str]:
    """Read a key file, refusing one that others can read: a leaked key is a leaked vault."""
    check_key_file(path)
    fields: dict[str, str] = {}
    lines = path.read_text("ascii", errors="replace").splitlines()
    if not lines or lines[0].strip() != KEY_FILE_HEADER:
        raise VaultKeyError(f"{path} is not a pacsvault key file")
    for line in lines[1:]:
        name, _, value = line.partition("=")
        fields[name.strip()] = value.strip()
    try:
        raw = base64.b64decode(fields["key"], validate=True)
        return MasterKey(raw), fields["vault"]
    except (KeyError, ValueError, VaultKeyError):
        raise VaultKeyError(f"{path} is damaged: it holds no valid master key") from None


def make_key_check(key: MasterKey, vault_id: str) -> str:
    """A value stored in the vault to recognise the right master key without storing it."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(key.derive(PURPOSE_CHECK, vault_id)).encrypt(
        nonce, _CHECK_PLAINTEXT, vault_id.encode()
    )
    return base64.b64encode(nonce + sealed).decode()


def verify_key_check(key: MasterKey, vault_id: str, check: str) -> bool:
    blob = base64.b64decode(check)
    try:
        plain = AESGCM(key.derive(PURPOSE_CHECK, vault_id)).decrypt(
            blob[:12], blob[12:], vault_id.encode()
        )
    except InvalidTag:
        return False
    return secrets.compare_digest(plain, _CHECK_PLAINTEXT)


# --- recovery code -----------------------------------------------------------------------


def new_recovery_code() -> str:
    """160 random bits as 8 groups of 4 base32 characters: easy to copy by hand onto paper."""
    text = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def _normalise_code(code: str) -> bytes:
    # ASCII letters and digits only: separators, spaces and stray accents typed on a
    # French keyboard are not part of the code.
    return "".join(ch for ch in code.upper() if ch.isascii() and ch.isalnum()).encode("ascii")


def _recovery_kek(code: str, salt: bytes) -> bytes:
    # scrypt although the code has 160 bits: it costs nothing at recovery time and
    # protects a code that was mistyped into a shorter one on paper.
    return Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=8, p=1).derive(_normalise_code(code))


def wrap_for_recovery(key: MasterKey, code: str, vault_id: str) -> dict[str, str]:
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_recovery_kek(code, salt)).encrypt(nonce, key.raw, vault_id.encode())
    return {
        "kdf": "scrypt-n32768-r8-p1",
        "salt": base64.b64encode(salt).decode(),
        "sealed": base64.b64encode(nonce + sealed).decode(),
    }


def unwrap_with_recovery(blob: dict[str, str], code: str, vault_id: str) -> MasterKey:
    salt = base64.b64decode(blob["salt"])
    sealed = base64.b64decode(blob["sealed"])
    try:
        raw = AESGCM(_recovery_kek(code, salt)).decrypt(sealed[:12], sealed[12:], vault_id.encode())
    except InvalidTag:
        raise VaultKeyError("this recovery code does not open this vault") from None
    return MasterKey(raw)


# --- named secrets wrapped by the master key -----------------------------------------------

PURPOSE_NAMED_SECRETS = "pacsvault/v1/named-secrets"


def wrap_secret(key: MasterKey, vault_id: str, name: str, secret: bytes) -> str:
    """Seal a random secret (backup repository password, sealed-mode private key...) under
    the master key, bound to its name. Kept in ``vault.json["secrets"][name]``, so a key
    rotation re-wraps every such secret in one place and the secret itself never changes
    (a backup repository keeps its password across rotations)."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(key.derive(PURPOSE_NAMED_SECRETS, vault_id)).encrypt(
        nonce, secret, f"{vault_id}/{name}".encode())
    return base64.b64encode(nonce + sealed).decode()


def unwrap_secret(key: MasterKey, vault_id: str, name: str, blob: str) -> bytes:
    raw = base64.b64decode(blob)
    try:
        return AESGCM(key.derive(PURPOSE_NAMED_SECRETS, vault_id)).decrypt(
            raw[:12], raw[12:], f"{vault_id}/{name}".encode())
    except InvalidTag:
        raise VaultKeyError(f"the vault secret {name!r} does not open with this key") from None


# --- backups ----------------------------------------------------------------------------

PURPOSE_BACKUP_RECOVERY = "pacsvault/v1/backup-recovery"


def backup_recovery_password(code: str) -> bytes:
    """The password of the second key of every backup repository, derived from the
    recovery code alone: a new machine with only the repository's location, its
    credentials and the recovery sheet opens the repository (the code has 160 random bits:
    no stretching needed). Hex, so restic reads it as a plain line."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=PURPOSE_BACKUP_RECOVERY.encode("ascii")).derive(
        _normalise_code(code)).hex().encode("ascii")


# --- de-identified exports (issue 19) -------------------------------------------------

# The named secret (``Vault.named_secret``, wrapped by the master key) every export project's
# pseudonym key comes from. A named secret rather than ``MasterKey.derive``: pseudonyms
# must survive a master key rotation, or a project's second export would no longer match
# its first.
DEIDENTIFY_SECRET = "deidentify-pseudonyms"  # noqa: S105 (the secret's name)
PURPOSE_DEIDENTIFY = "pacsvault/v1/deidentify-project"
PURPOSE_DEIDENTIFY_LINKS = "pacsvault/v1/deidentify-link-table"


def project_key(root: bytes, vault_id: str, project: str, purpose: str = PURPOSE_DEIDENTIFY
                ) -> bytes:
    """The HMAC key of one export project: HKDF over the vault's de-identification secret,
    bound to the vault and to the project's name, so the same patient gets the same
    pseudonym in every export of that project and an unrelated one in any other."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=vault_id.encode("ascii"),
                info=purpose.encode("ascii") + b"\x00" + project.encode("utf-8")
                ).derive(root)
