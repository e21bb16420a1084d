"""Backup runs, verification, retention and restore, over restic (``backup.restic``).

A run, for every configured target (see ARCHITECTURE.md, "Backups"):

1. **Stage** a point-in-time copy of what is not immutable under ``DATA/.backup-staging/``
   (ciphertext only, deleted after the run): the index with ``VACUUM INTO`` (SQLCipher
   keeps it encrypted under the same key; one statement = one consistent read
   transaction, taken while ``serve`` keeps committing), in which every
   ``data_keys.wrapped`` is then set to NULL (``secure_delete`` + ``VACUUM``: the pages are
   gone); ``vault.json``, ``pacsvault.toml``, ``tls/``; the trail cut right after the
   record the copy's anchor names (records appended since belong to the next snapshot);
   and hard links to the objects the copy names that are still staged in
   ``objects/.spare`` (committed, not yet published).
2. **Data snapshot** (tag ``data``): the staging dir and ``objects/`` in place (objects are
   immutable; ``.tmp`` and ``.spare`` excluded). Objects published after the index copy
   are harmless extras.
3. **Keystore snapshot** (tag ``keystore``): one small file, every live data key wrapped
   under a key derived from the ``backup-repository`` secret (stable across master key
   rotations); older keystore snapshots are forgotten and pruned. A restore combines the
   chosen data snapshot with the *latest* keystore: a patient whose key was destroyed
   since (erasure) stays unreadable in every older snapshot (``keys_destroyed``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlcipher3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pacsvault import config
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.backup import state as backup_state
from pacsvault.backup.restic import (
    NoRepository,
    Repository,
    ResticError,
    WrongPassword,
    read_credentials,
)
from pacsvault.crypto import datakeys, keys

if TYPE_CHECKING:
    from pacsvault.vault import Vault

REPOSITORY_SECRET = "backup-repository"  # noqa: S105 (a secret's name)
RECOVERY_SECRET = "backup-recovery-password"  # noqa: S105 (= vault.BACKUP_RECOVERY_SECRET)
PURPOSE_KEYSTORE = "pacsvault/v1/backup-keystore"
PURPOSE_REPOSITORY_PASSWORD = "pacsvault/v1/backup-repository-password"  # noqa: S105
KEYSTORE_FORMAT = "pacsvault-backup-keystore/1"
KEYSTORE_FILE = "keystore.json"
STAGING_DIR = ".backup-staging"
CACHE_DIR = ".backup-cache"
LOCK_NAME = "backup.lock"  # flock'ed by a run or a prune (serve's schedule, the CLI)
PENDING_DIR = "pending-objects"  # in the staging dir: committed objects not yet published
TAG_ALL, TAG_DATA, TAG_KEYSTORE = "pacsvault", "data", "keystore"
_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DateTime text in SQLite


class BackupError(Exception):
    """A backup command cannot do what was asked (message is one user-facing line)."""


class NeedRecoveryCode(BackupError):
    """This vault predates backups: the recovery-code key of the repositories can only be
    made once someone types the recovery code (``backup init`` asks for it)."""


@dataclass(frozen=True)
class BackupOutcome:
    target: str
    ok: bool
    snapshot: str | None
    error: str | None
    files: int
    bytes_added: int
    seconds: float


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    time: str
    kind: str  # "data" | "keystore"
    size: int | None


@dataclass(frozen=True)
class RestoreResult:
    data_dir: Path
    key_file: Path | None  # None for a drill (the copy opens with Vault.open_copy)
    snapshot: str
    instances: int
    keys_restored: int
    keys_absent: int  # data keys destroyed since (or before) the snapshot: unreadable
    objects_missing: int  # index rows whose object the snapshot lacks (removed meanwhile)


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


def _ensure_recovery_key(vault: Vault, target: config.BackupTarget, repo: Repository) -> bool:
    """Give the repository the recovery-code key if it lacks it; True when it has it."""
    recovery = _stored_secret(vault, RECOVERY_SECRET)
    if recovery is None:
        return False
    probe = Repository(repo.location, recovery, repo.env, repo.binary, repo.cache_dir)
    try:
        probe.run(["cat", "config"])
    except WrongPassword:
        repo.add_key(recovery)
    backup_state.set_pending_recovery_key(vault.layout, target.name, False)
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


def recovery_code_changed(vault: Vault, code: str) -> None:
    """A key rotation gave the vault a new recovery code: store the new recovery password
    and add it as a key to every reachable repository (old keys stay: old snapshots, whose
    ``vault.json`` holds the old master, restore with the old code). Targets out of reach
    are remembered in the state file and get the key at their next run."""
    vault.set_named_secret(RECOVERY_SECRET, keys.backup_recovery_password(code))
    for target in vault.settings.backup.targets:
        backup_state.set_pending_recovery_key(vault.layout, target.name, True)
        with contextlib.suppress(ResticError, BackupError):
            _ensure_recovery_key(vault, target, _repo(vault, target))


# --- staging -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Staged:
    root: Path
    anchor_seq: int
    instances: int
    pending: int


def _index_key(vault: Vault) -> str:
    return _master(vault).derive(keys.PURPOSE_INDEX, vault.vault_id).hex()


def _connect(path: Path, key_hex: str) -> sqlcipher3.Connection:
    conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA key = \"x'{key_hex}'\"")
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA temp_store = MEMORY")  # SQLite's temp files would be clear text
    return conn


def _copy_index(vault: Vault, dest: Path) -> tuple[int, list[str]]:
    """Consistent encrypted copy of the live index without any wrapped data key; returns
    the trail anchor's seq and the object ids the copy names."""
    key_hex = _index_key(vault)
    live = _connect(vault.layout.index, key_hex)
    try:
        # One statement, one read transaction: a point in time even while serve commits.
        live.execute("VACUUM INTO ?", (str(dest),))
    finally:
        live.close()
    os.chmod(dest, 0o600)  # as the live index (VACUUM INTO follows the umask)
    copy = _connect(dest, key_hex)
    try:
        copy.execute("PRAGMA secure_delete = ON")
        copy.execute("UPDATE data_keys SET wrapped = NULL")
        copy.execute("VACUUM")  # rewrites every page: the old key pages are gone
        row = copy.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
        ids = [r[0] for r in copy.execute("SELECT object_id FROM instances")]
        left = copy.execute(
            "SELECT count(*) FROM data_keys WHERE wrapped IS NOT NULL").fetchone()[0]
        if left:
            raise BackupError("the index copy still holds data keys; backup stopped")
    finally:
        copy.close()
    return (int(row[0]) if row else 0), ids


def _copy_trail(source: Path, dest: Path, anchor_seq: int) -> None:
    """The trail up to the record the index copy anchors (inclusive): what a restored
    vault verifies against its own anchor. Torn or repair lines before it stay as they
    are (their repair record describes them). Streamed: a year of trail is large."""
    dest.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        try:
            src = source.open("rb")
        except FileNotFoundError:
            return
        with src:
            held: list[bytes] = []  # lines after the last record kept, not yet written
            for line in src:
                if not line.endswith(b"\n"):  # a last line being written
                    break
                seq = _record_seq(line)
                if seq is not None and seq > anchor_seq:
                    break
                held.append(line)
                if seq is not None:
                    out.writelines(held)
                    held.clear()


def _record_seq(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if isinstance(seq, int) else None


def _stage(vault: Vault) -> _Staged:
    layout = vault.layout
    root = layout.root / STAGING_DIR
    shutil.rmtree(root, ignore_errors=True)  # a run killed before cleaning up
    root.mkdir(mode=0o700)
    anchor_seq, ids = _copy_index(vault, root / "index.db")
    _copy_trail(layout.audit / "trail.jsonl", root / "audit" / "trail.jsonl", anchor_seq)
    for name in ("vault.json", config.CONFIG_NAME):
        shutil.copy2(layout.root / name, root / name)
    if (layout.root / "tls").is_dir():
        shutil.copytree(layout.root / "tls", root / "tls")
    pending_dir = root / PENDING_DIR
    pending_dir.mkdir(mode=0o700)
    pending = 0
    objects = layout.objects
    for object_id in ids:
        if vault.objects.path(object_id).exists():
            continue
        for staged in (objects / ".spare" / f"{object_id}.part",
                       objects / ".tmp" / f"{object_id}.part"):
            try:
                try:
                    os.link(staged, pending_dir / f"{object_id}.part")
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    shutil.copy2(staged, pending_dir / f"{object_id}.part")
            except FileNotFoundError:
                continue
            pending += 1
            break
        # neither published nor staged a moment ago: published meanwhile (restic reads
        # objects/ after this), or removed by an administrator since the copy.
    return _Staged(root, anchor_seq, len(ids), pending)


# --- keystore ------------------------------------------------------------------------------


def _keystore(vault: Vault) -> bytes:
    """Every live data key, wrapped under the backup keystore key (AES-GCM, the same
    format as in the index; a key the live KEK cannot open, e.g. sealed-mode, as is)."""
    kek = _master(vault).derive(keys.PURPOSE_KEK, vault.vault_id)
    store_key = _keystore_key(vault.named_secret(REPOSITORY_SECRET), vault.vault_id)
    entries: dict[str, str] = {}
    live = _connect(vault.layout.index, _index_key(vault))
    try:
        rows = live.execute(
            "SELECT key_id, wrapped FROM data_keys WHERE wrapped IS NOT NULL").fetchall()
    finally:
        live.close()
    for key_id, wrapped in rows:
        kid = uuid.UUID(key_id)
        try:
            raw = datakeys.unwrap(kek, kid, bytes(wrapped))
            entries[key_id] = "w:" + base64.b64encode(
                datakeys.wrap(store_key, kid, raw)).decode()
        except datakeys.DataKeyError:
            entries[key_id] = "a:" + base64.b64encode(bytes(wrapped)).decode()
    body = {"format": KEYSTORE_FORMAT, "vault_id": vault.vault_id,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "keys": entries}
    return json.dumps(body, sort_keys=True).encode("utf-8")


def _push_keystore(vault: Vault, repo: Repository, target: str, *,
                   thorough: bool = False) -> str:
    """A fresh keystore snapshot, then every older one forgotten and pruned: keys
    destroyed since the previous one are then gone from this repository's files. Every
    entry is wrapped with a fresh nonce, so no chunk of an older keystore is shared with
    the new one and its packs become wholly unused (deleted by a plain prune);
    ``thorough`` (after an erasure) also repacks any partly used pack."""
    # Keys destroyed after this moment may still be in it (full precision: a destruction
    # in the same second must not look older than the keystore).
    read_at = dt.datetime.now(dt.UTC).isoformat()
    summary = repo.backup_stdin(_keystore(vault), KEYSTORE_FILE,
                                tags=[TAG_ALL, TAG_KEYSTORE], host=_host(vault.vault_id))
    new_id = str(summary.get("snapshot_id", ""))
    older = [str(s["id"]) for s in repo.snapshots(TAG_KEYSTORE)
             if not str(s.get("id", "")).startswith(new_id)]
    if older:
        repo.forget(older)
        repo.prune(thorough=thorough)
    backup_state.update_target(vault.layout, target,
                               lambda entry: entry.__setitem__("keystore_time", read_at))
    return new_id


# --- runs ------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(vault: Vault) -> Iterator[None]:
    """One run or prune at a time per vault (the schedule in serve and a CLI run share
    the staging directory); a second one is refused at once rather than queued."""
    fd = os.open(vault.layout.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError("another backup or prune of this vault is running") from None
        yield
    finally:
        os.close(fd)


def _backup_one(vault: Vault, target: config.BackupTarget, staged: _Staged) -> BackupOutcome:
    started = time.monotonic()
    try:
        repo = _repo(vault, target)
        repo.unlock()  # stale locks of a run killed with serve (ours hold the flock)
        root = vault.layout.root
        summary = repo.backup(
            [STAGING_DIR, "objects"], cwd=root, tags=[TAG_ALL, TAG_DATA],
            host=_host(vault.vault_id),
            # restic matches excludes against the absolute path it resolved from cwd
            excludes=[str(vault.layout.objects.resolve() / ".tmp"),
                      str(vault.layout.objects.resolve() / ".spare")])
        _push_keystore(vault, repo, target.name)
        if backup_state.target_state(vault.layout, target.name).get("pending_recovery_key"):
            _ensure_recovery_key(vault, target, repo)
        return BackupOutcome(
            target.name, True, str(summary.get("snapshot_id") or "") or None, None,
            int(summary.get("total_files_processed", 0)), int(summary.get("data_added", 0)),
            round(time.monotonic() - started, 3))
    except (ResticError, BackupError, OSError) as exc:
        message = str(exc) if isinstance(exc, ResticError | BackupError) \
            else f"{type(exc).__name__} while reading the data directory"
        return BackupOutcome(target.name, False, None, message, 0, 0,
                             round(time.monotonic() - started, 3))


def run_backup(vault: Vault, targets: list[str] | None = None) -> list[BackupOutcome]:
    """Back up to the named targets (all configured ones by default). One staging serves
    every target; each target's result is an audit event and a state-file entry."""
    chosen = [_target(vault, n) for n in targets] if targets is not None \
        else list(vault.settings.backup.targets)
    if not chosen:
        return []
    try:
        with _exclusive(vault):
            return _run_locked(vault, chosen)
    except BackupError as exc:  # another run holds the lock: a failure for every target
        outcomes = [BackupOutcome(t.name, False, None, str(exc), 0, 0, 0.0) for t in chosen]
        for outcome in outcomes:
            _emit(vault, "backup.run", False, "backup failed",
                  {"target": outcome.target, "error": str(exc)})
        return outcomes


def _run_locked(vault: Vault, chosen: list[config.BackupTarget]) -> list[BackupOutcome]:
    outcomes: list[BackupOutcome] = []
    started = time.monotonic()
    try:
        staged: _Staged | None = _stage(vault)
        failure = ""
    except (OSError, sqlcipher3.Error, BackupError) as exc:
        staged = None
        failure = str(exc) if isinstance(exc, BackupError) else \
            f"the vault could not be copied for backup ({type(exc).__name__})"
    try:
        for target in chosen:
            if staged is None:
                outcome = BackupOutcome(target.name, False, None, failure, 0, 0,
                                        round(time.monotonic() - started, 3))
            else:
                outcome = _backup_one(vault, target, staged)
            backup_state.record_backup(vault.layout, outcome)
            detail: dict[str, str | int | bool] = {
                "target": target.name, "files": outcome.files,
                "bytes_added": outcome.bytes_added, "seconds": str(outcome.seconds)}
            if outcome.snapshot:
                detail["snapshot"] = outcome.snapshot
            if outcome.error:
                detail["error"] = outcome.error
            _emit(vault, "backup.run", outcome.ok,
                  "backup done" if outcome.ok else "backup failed", detail)
            outcomes.append(outcome)
    finally:
        shutil.rmtree(vault.layout.root / STAGING_DIR, ignore_errors=True)
    return outcomes


def verify(vault: Vault, target: str, read_data: bool = True) -> BackupOutcome:
    """``restic check`` (``--read-data``: every pack downloaded and authenticated)."""
    chosen = _target(vault, target)
    started = time.monotonic()
    error: str | None = None
    try:
        _repo(vault, chosen).check(read_data)
    except ResticError as exc:
        error = str(exc)
    outcome = BackupOutcome(target, error is None, None, error, 0, 0,
                            round(time.monotonic() - started, 3))
    detail: dict[str, str | int | bool] = {"target": target, "read_data": read_data}
    if error:
        detail["error"] = error
    _emit(vault, "backup.verify", outcome.ok,
          "backup repository verified" if outcome.ok else "backup repository damaged", detail)
    return outcome


def prune(vault: Vault, target: str) -> BackupOutcome:
    """Retention: forget data snapshots beyond keep_daily/weekly/monthly/yearly, keep the
    latest keystore only, then prune the unreferenced data."""
    chosen = _target(vault, target)
    settings = vault.settings.backup
    started = time.monotonic()
    error: str | None = None
    try:
        with _exclusive(vault):
            repo = _repo(vault, chosen)
            repo.unlock()
            keep = {"daily": settings.keep_daily, "weekly": settings.keep_weekly,
                    "monthly": settings.keep_monthly, "yearly": settings.keep_yearly}
            if any(keep.values()):
                repo.forget_policy(TAG_DATA, keep)
            stores = sorted(repo.snapshots(TAG_KEYSTORE),
                            key=lambda s: str(s.get("time", "")))
            repo.forget([str(s["id"]) for s in stores[:-1]])
            repo.prune()
    except (ResticError, BackupError) as exc:
        error = str(exc)
    outcome = BackupOutcome(target, error is None, None, error, 0, 0,
                            round(time.monotonic() - started, 3))
    detail: dict[str, str | int | bool] = {"target": target}
    if error:
        detail["error"] = error
    _emit(vault, "backup.prune", outcome.ok,
          "old snapshots removed" if outcome.ok else "pruning failed", detail)
    return outcome


def _kind(snapshot: dict[str, Any]) -> str:
    return TAG_KEYSTORE if TAG_KEYSTORE in (snapshot.get("tags") or []) else TAG_DATA


def list_snapshots(vault: Vault, target: str) -> list[SnapshotInfo]:
    """Snapshots of a target, oldest first (restic 0.14 keeps no size in a snapshot)."""
    try:
        found = _repo(vault, _target(vault, target)).snapshots()
    except ResticError as exc:
        raise BackupError(f"{target}: {exc}") from None
    return [SnapshotInfo(str(s.get("short_id") or s["id"][:8]), str(s.get("time", "")),
                         _kind(s), None)
            for s in sorted(found, key=lambda s: str(s.get("time", "")))]


def keys_destroyed(vault: Vault) -> dict[str, str]:
    """Called after data keys were destroyed (erasure): each reachable target gets a fresh
    keystore snapshot and loses every older one (forget + prune), so the destroyed keys
    are physically gone from every repository. Returns target -> "ok" or the error; a
    target out of reach is caught up by its next run (which does the same)."""
    results: dict[str, str] = {}
    for target in vault.settings.backup.targets:
        try:
            repo = _repo(vault, target)
            snapshot = _push_keystore(vault, repo, target.name, thorough=True)
            results[target.name] = "ok"
            detail: dict[str, str | int | bool] = {"target": target.name,
                                                   "snapshot": snapshot}
            _emit(vault, "backup.keystore", True, "backup keystore replaced", detail)
        except (ResticError, BackupError) as exc:
            results[target.name] = str(exc)
            _emit(vault, "backup.keystore", False, "backup keystore not replaced",
                  {"target": target.name, "error": str(exc)})
    return results


# --- restore ---------------------------------------------------------------------------


def _pick(snapshots: list[dict[str, Any]], wanted: str, kind: str) -> dict[str, Any]:
    of_kind = sorted((s for s in snapshots if _kind(s) == kind),
                     key=lambda s: str(s.get("time", "")))
    if not of_kind:
        raise BackupError(f"the repository holds no {kind} snapshot")
    if wanted == "latest":
        return of_kind[-1]
    found = [s for s in of_kind if str(s.get("id", "")).startswith(wanted.lower())]
    if len(found) != 1 or len(wanted) < 4:
        raise BackupError(f"no single {kind} snapshot {wanted!r} (see 'pacsvault backup "
                          "list')")
    return found[0]


def _check_target_dir(to: Path) -> None:
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise BackupError(f"{to} is not an empty directory; restore only into a new one")


def restore(repository: str, credentials_file: Path | None, recovery_code: str | None,
            to: Path, key_file: Path | None, snapshot: str = "latest", *,
            password: bytes | None = None, master: keys.MasterKey | None = None,
            binary: str = "restic") -> RestoreResult:
    """Restore a data snapshot into the empty directory ``to`` with the latest keystore.

    New machine: ``recovery_code`` opens the repository (its second key) and the
    snapshot's ``vault.json`` (the master key), and ``key_file`` is written (default: the
    usual place for this vault id). Drill: ``password`` (the repository password) and the
    live ``master``; no key file is written, open the copy with ``Vault.open_copy``.
    Nothing is written before the repository and the keystore have opened.
    """
    if recovery_code is None and (password is None or master is None):
        raise BackupError("a recovery code is needed to restore")
    _check_target_dir(to)
    if key_file is not None and key_file.exists():
        raise BackupError(f"key file {key_file} already exists; refusing to overwrite it")
    repo_password = keys.backup_recovery_password(recovery_code) if recovery_code \
        else password
    assert repo_password is not None
    repo = Repository(repository, repo_password, read_credentials(credentials_file), binary)
    try:
        found = repo.snapshots()
    except WrongPassword:
        raise BackupError("this recovery code does not open the backup repository "
                          "(nothing was written)") from None
    except NoRepository as exc:
        raise BackupError(str(exc).replace(" (run 'pacsvault backup init')", "")) from None
    except ResticError as exc:
        raise BackupError(str(exc)) from None
    data = _pick(found, snapshot, TAG_DATA)
    # the keystore of the same vault (a repository shared by two vaults stays usable)
    store = _pick([s for s in found if s.get("hostname") == data.get("hostname")],
                  "latest", TAG_KEYSTORE)
    try:
        keystore = json.loads(repo.dump(str(store["id"]), f"/{KEYSTORE_FILE}"))
    except (ResticError, ValueError) as exc:
        raise BackupError(f"the backup keystore cannot be read ({exc})") from None
    created = not to.exists()
    try:
        return _restore_into(repo, data, keystore, recovery_code, master, to, key_file)
    except BaseException:
        if created:
            shutil.rmtree(to, ignore_errors=True)
        elif to.is_dir():
            for child in to.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _restore_into(repo: Repository, data: dict[str, Any], keystore: dict[str, Any],
                  recovery_code: str | None, master: keys.MasterKey | None, to: Path,
                  key_file: Path | None) -> RestoreResult:
    from pacsvault.service import lock as instance_lock
    from pacsvault.vault import default_key_path

    to.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(to, 0o700)
    try:
        repo.restore(str(data["id"]), to)
    except ResticError as exc:
        raise BackupError(str(exc)) from None
    staging = to / STAGING_DIR
    if not (staging / "vault.json").is_file():
        raise BackupError("this snapshot is not a pacsvault backup (no vault.json)")
    for child in staging.iterdir():
        if child.name != PENDING_DIR:
            os.replace(child, to / child.name)
    meta = json.loads((to / "vault.json").read_text("utf-8"))
    vault_id = str(meta["vault_id"])
    if keystore.get("format") != KEYSTORE_FORMAT or keystore.get("vault_id") != vault_id:
        raise BackupError("the backup keystore belongs to another vault")
    if recovery_code is not None:
        try:
            master = keys.unwrap_with_recovery(meta["recovery"], recovery_code, vault_id)
        except keys.VaultKeyError:
            raise BackupError("this recovery code opens the repository but not this "
                              "snapshot's vault (taken before a key rotation? use the "
                              "recovery code of that time)") from None
    assert master is not None
    if not keys.verify_key_check(master, vault_id, str(meta["key_check"])):
        raise BackupError("the master key does not open this snapshot's vault")
    secret_blob = (meta.get("secrets") or {}).get(REPOSITORY_SECRET)
    if not isinstance(secret_blob, str):
        raise BackupError("this snapshot's vault.json lacks the backup repository secret")
    store_key = _keystore_key(
        keys.unwrap_secret(master, vault_id, REPOSITORY_SECRET, secret_blob), vault_id)
    kek = master.derive(keys.PURPOSE_KEK, vault_id)
    entries = keystore.get("keys") or {}
    restored = absent = missing = instances = 0
    conn = _connect(to / "index.db", master.derive(keys.PURPOSE_INDEX, vault_id).hex())
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None).strftime(_DATETIME_FORMAT)
        conn.execute("BEGIN IMMEDIATE")
        for key_id, destroyed in conn.execute(
                "SELECT key_id, destroyed FROM data_keys").fetchall():
            entry = entries.get(key_id)
            if isinstance(entry, str) and entry.startswith("w:"):
                kid = uuid.UUID(key_id)
                raw = datakeys.unwrap(store_key, kid, base64.b64decode(entry[2:]))
                wrapped = datakeys.wrap(kek, kid, raw)
            elif isinstance(entry, str) and entry.startswith("a:"):
                wrapped = base64.b64decode(entry[2:])
            else:  # destroyed (erased) since this snapshot, or before it
                absent += 1
                if destroyed is None:
                    conn.execute("UPDATE data_keys SET destroyed = ? WHERE key_id = ?",
                                 (now, key_id))
                continue
            conn.execute("UPDATE data_keys SET wrapped = ? WHERE key_id = ?",
                         (wrapped, key_id))
            restored += 1
        conn.execute("COMMIT")
        ids = [r[0] for r in conn.execute("SELECT object_id FROM instances")]
    finally:
        conn.close()
    # Settle objects that were committed but still staged at backup time.
    objects = to / "objects"
    (objects / ".tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
    pending = staging / PENDING_DIR
    if pending.is_dir():
        for part in pending.iterdir():
            object_id = part.name.removesuffix(".part")
            final = objects / object_id[:2] / object_id[2:4] / f"{object_id}.pvo"
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(part, final)
    shutil.rmtree(staging, ignore_errors=True)
    for object_id in ids:
        instances += 1
        if not (objects / object_id[:2] / object_id[2:4] / f"{object_id}.pvo").exists():
            missing += 1
    instance_lock.create_lock_file(to)
    written: Path | None = None
    if recovery_code is not None:
        written = key_file or default_key_path(vault_id)
        _point_settings_at(to, written)
        keys.write_key_file(written, master, vault_id)
    return RestoreResult(to, written, str(data.get("short_id") or data["id"])[:8],
                         instances, restored, absent, missing)


def _point_settings_at(data_dir: Path, key_file: Path) -> None:
    """The restored settings may name the old machine's key file: name the new one."""
    path = data_dir / config.CONFIG_NAME
    lines = path.read_text("utf-8").splitlines()
    section = ""
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip()
        elif section == "server" and stripped.startswith("key_file") and "=" in stripped:
            lines[number] = f"key_file = {json.dumps(str(key_file.resolve()))}"
    path.write_text("\n".join(lines) + "\n", "utf-8")


def drill_restore(vault: Vault, target: str, to: Path,
                  snapshot: str = "latest") -> RestoreResult:
    """Restore a target's snapshot for a restore drill, opened with the live keys: no key
    file is written; open the copy with ``vault.open_copy(to)``, check it, delete it."""
    chosen = _target(vault, target)
    return restore(chosen.repository, _credentials_path(chosen), None, to, None, snapshot,
                   password=_repository_password(vault), master=_master(vault),
                   binary=vault.settings.backup.restic_binary)
