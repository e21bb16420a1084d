"""Backup targets and their keys: which repository a target names, the passwords that
open it, the recovery-code key, and the audit events of backup commands.

Why apart from the runs: every backup operation (run, verify, prune, restore, keystore
replacement after an erasure) starts here, and the derivations must be the same for all of
them: the repository password and the keystore key both come one-way from the vault's
``backup-repository`` secret, so that whoever holds the password restic is handed cannot
unwrap the data keys. Names with a leading underscore are the package's own helpers
(``runner``, ``staging``, ``restore``, ``drill`` use them).
"""

from __future__ import annotations

import hmac
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pacsvault import config
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.backup import state as backup_state
from pacsvault.backup.restic import Repository, ResticError, WrongPassword, read_credentials
from pacsvault.crypto import keys
from pacsvault.vaultfile import BACKUP_RECOVERY_SECRET

if TYPE_CHECKING:
    from pacsvault.vault import Vault

REPOSITORY_SECRET = "backup-repository"  # noqa: S105 (a secret's name)
RECOVERY_SECRET = BACKUP_RECOVERY_SECRET  # replaced by a key rotation (a new recovery code)
PURPOSE_KEYSTORE = "pacsvault/v1/backup-keystore"
PURPOSE_REPOSITORY_PASSWORD = "pacsvault/v1/backup-repository-password"  # noqa: S105
KEYSTORE_FORMAT = "pacsvault-backup-keystore/1"
KEYSTORE_FILE = "keystore.json"
STAGING_DIR = ".backup-staging"
CACHE_DIR = ".backup-cache"
LOCK_NAME = "backup.lock"  # flock'ed by a run or a prune (serve's schedule, the CLI)
PENDING_DIR = "pending-objects"  # in the staging dir: committed objects not yet published
TAG_ALL, TAG_DATA, TAG_KEYSTORE = "pacsvault", "data", "keystore"
TAG_INDEX = "pg-index"  # a PostgreSQL index dump (issue 16), paired by its run-* tag
_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DateTime text in SQLite


class BackupError(Exception):
    """A backup command cannot do what was asked (message is one user-facing line)."""


class NeedRecoveryCode(BackupError):
    """This vault predates backups: the recovery-code key of the repositories can only be
    made once someone types the recovery code (``backup init`` asks for it)."""

# --- keys and repositories -----------------------------------------------------------------


def _master(vault: Vault) -> keys.MasterKey:
    # The vault keeps its master key private; the backup is one of the few places that
    # needs it directly (index copy, keystore), within the package.
    return vault._master


def _repository_password(vault: Vault) -> bytes:
    """restic password #1. Derived (one-way) from the repository secret rather than the
    secret itself: the keystore key is derived from the same secret, and whoever learns
    this password (it is handed to restic) must not be able to unwrap the data keys."""
    return _derive(vault.named_secret(REPOSITORY_SECRET), vault.vault_id,
                   PURPOSE_REPOSITORY_PASSWORD).hex().encode("ascii")


def _stored_secret(vault: Vault, name: str) -> bytes | None:
    """A named secret if the vault has it (``named_secret`` would make a random one)."""
    try:
        meta = json.loads(vault.layout.meta.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    table = meta.get("secrets") if isinstance(meta, dict) else None
    if isinstance(table, dict) and isinstance(table.get(name), str):
        return vault.named_secret(name)
    return None


def _derive(secret: bytes, vault_id: str, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=vault_id.encode("ascii"),
                info=purpose.encode("ascii")).derive(secret)


def _keystore_key(repository_secret: bytes, vault_id: str) -> bytes:
    return _derive(repository_secret, vault_id, PURPOSE_KEYSTORE)


def _target(vault: Vault, name: str) -> config.BackupTarget:
    for target in vault.settings.backup.targets:
        if target.name == name:
            return target
    known = ", ".join(t.name for t in vault.settings.backup.targets) or "none configured"
    raise BackupError(f"no backup target named {name!r} ([backup] targets: {known})")


def _credentials_path(target: config.BackupTarget) -> Path | None:
    return Path(target.credentials_file) if target.credentials_file else None


def _repo(vault: Vault, target: config.BackupTarget, password: bytes | None = None
          ) -> Repository:
    return Repository(
        location=target.repository,
        password=password if password is not None else _repository_password(vault),
        env=read_credentials(_credentials_path(target)),
        binary=vault.settings.backup.restic_binary,
        cache_dir=vault.layout.root / CACHE_DIR,
    )


def _host(vault_id: str) -> str:
    # A stable host name: restic finds its parent snapshot (fast, unchanged files are
    # not read again) even after the machine was renamed or replaced.
    return f"pacsvault-{vault_id[:8]}"


def _emit(vault: Vault, action: str, ok: bool, message: str,
          detail: dict[str, str | int | bool]) -> None:
    vault.recorder.emit(AuditEvent(
        action=action, outcome=Outcome.SUCCESS if ok else Outcome.SERIOUS_FAILURE,
        code=EventCode.APPLICATION_ACTIVITY, actor_user="pacsvault", message=message,
        detail=detail))


# --- init and the recovery-code key ------------------------------------------------------


def set_recovery_code(vault: Vault, code: str) -> None:
    """Store the repositories' recovery password for a vault made before backups existed:
    only once the code is proved to open this vault's own ``recovery`` blob."""
    meta = json.loads(vault.layout.meta.read_text("utf-8"))
    recovery = meta.get("recovery")
    if not isinstance(recovery, dict):
        raise BackupError("vault.json has no recovery data")
    try:
        opened = keys.unwrap_with_recovery(recovery, code, vault.vault_id)
    except (keys.VaultKeyError, ValueError, KeyError):
        raise BackupError("this recovery code does not open this vault") from None
    if not secrets.compare_digest(opened.raw, _master(vault).raw):
        raise BackupError("this recovery code does not open this vault")
    vault.set_named_secret(RECOVERY_SECRET, keys.backup_recovery_password(code))


def has_recovery_password(vault: Vault) -> bool:
    return _stored_secret(vault, RECOVERY_SECRET) is not None


def _recovery_fingerprint(recovery: bytes, location: str) -> str:
    """Names which recovery password was registered with which repository, for the state
    file (no secret there): an HMAC keyed by the password, so it reveals nothing of it."""
    return hmac.new(recovery, b"pacsvault/v1/backup-recovery-registered\0"
                    + location.encode("utf-8"), "sha256").hexdigest()[:32]


def recovery_key_behind(vault: Vault, target: config.BackupTarget) -> bool:
    """The vault's recovery password is not the one this target last registered: a key
    rotation gave a new recovery code since its last backup, so its latest snapshot opens
    only with the old code. The next backup registers the new key and makes a snapshot
    the new code opens (``serve`` runs it at once; a drill before it would fail)."""
    recovery = _stored_secret(vault, RECOVERY_SECRET)
    if recovery is None:
        return False
    registered = backup_state.target_state(vault.layout, target.name).get("recovery_key")
    return not (isinstance(registered, str) and secrets.compare_digest(
        registered, _recovery_fingerprint(recovery, target.repository)))


def _ensure_recovery_key(vault: Vault, target: config.BackupTarget, repo: Repository) -> bool:
    """Give the repository the recovery-code key if it lacks it; True when it has it.

    Asks the repository only when the vault's recovery password is not the one this
    target last registered (state file): after a key rotation, which replaced the
    password with the new code's, or the first time. Old keys stay in the repository:
    a snapshot taken before a rotation holds the ``vault.json`` of its time, which only
    the old code opens."""
    recovery = _stored_secret(vault, RECOVERY_SECRET)
    if recovery is None:
        return False
    fingerprint = _recovery_fingerprint(recovery, repo.location)
    registered = backup_state.target_state(vault.layout, target.name).get("recovery_key")
    if isinstance(registered, str) and secrets.compare_digest(registered, fingerprint):
        return True
    probe = Repository(repo.location, recovery, repo.env, repo.binary, repo.cache_dir)
    try:
        probe.run(["cat", "config"])
    except WrongPassword:
        repo.add_key(recovery)
    backup_state.set_recovery_key(vault.layout, target.name, fingerprint)
    return True


def init(vault: Vault, name: str) -> str:
    """Create the target's repository if needed (password from the vault) and give it the
    recovery-code key. Returns a one-line progress message."""
    target = _target(vault, name)
    if not has_recovery_password(vault):
        raise NeedRecoveryCode("this vault predates backups: the recovery code is needed "
                               "once (pass --recovery-code-file, or run at a terminal)")
    repo = _repo(vault, target)
    try:
        created = not repo.exists()
        if created:
            repo.init()
        _ensure_recovery_key(vault, target, repo)
    except WrongPassword:
        raise BackupError(f"{name}: a repository at {target.repository} does not open with "
                          "this vault's key (another vault's backups?); choose another "
                          "location") from None
    except ResticError as exc:
        raise BackupError(f"{name}: {exc}") from None
    _emit(vault, "backup.init", True, "backup repository ready",
          {"target": name, "created": created})
    return f"{name}: repository {'created' if created else 'already there'}, " \
           "recovery-code key present"


# --- snapshots -----------------------------------------------------------------------------


def _kind(snapshot: dict[str, Any]) -> str:
    tags = snapshot.get("tags") or []
    if TAG_KEYSTORE in tags:
        return TAG_KEYSTORE
    return TAG_INDEX if TAG_INDEX in tags else TAG_DATA
