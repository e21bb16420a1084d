"""Backup runs, verification, retention and restore, over restic (``backup.restic``).

A run, for every configured target (see docs/backups.md):

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

The module is the runs themselves (one staging for every target, verify, prune, keystore
replacement); the targets and their keys are ``targets``, the staging ``staging``, restore
``restore``. Every name callers used from here is still importable from here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlcipher3

from pacsvault import config
from pacsvault.backup import pgindex, s3objects
from pacsvault.backup import state as backup_state
from pacsvault.backup.restic import Repository, ResticError
from pacsvault.backup.restore import RestoreResult as RestoreResult
from pacsvault.backup.restore import drill_restore as drill_restore
from pacsvault.backup.restore import restore as restore
from pacsvault.backup.staging import _keystore, _stage, _Staged
from pacsvault.backup.targets import CACHE_DIR as CACHE_DIR
from pacsvault.backup.targets import KEYSTORE_FILE as KEYSTORE_FILE
from pacsvault.backup.targets import KEYSTORE_FORMAT as KEYSTORE_FORMAT
from pacsvault.backup.targets import LOCK_NAME as LOCK_NAME
from pacsvault.backup.targets import PENDING_DIR as PENDING_DIR
from pacsvault.backup.targets import PURPOSE_KEYSTORE as PURPOSE_KEYSTORE
from pacsvault.backup.targets import PURPOSE_REPOSITORY_PASSWORD as PURPOSE_REPOSITORY_PASSWORD
from pacsvault.backup.targets import RECOVERY_SECRET as RECOVERY_SECRET
from pacsvault.backup.targets import REPOSITORY_SECRET as REPOSITORY_SECRET
from pacsvault.backup.targets import STAGING_DIR as STAGING_DIR
from pacsvault.backup.targets import TAG_ALL as TAG_ALL
from pacsvault.backup.targets import TAG_DATA as TAG_DATA
from pacsvault.backup.targets import TAG_INDEX as TAG_INDEX
from pacsvault.backup.targets import TAG_KEYSTORE as TAG_KEYSTORE
from pacsvault.backup.targets import BackupError as BackupError
from pacsvault.backup.targets import NeedRecoveryCode as NeedRecoveryCode
from pacsvault.backup.targets import _emit as _emit
from pacsvault.backup.targets import _ensure_recovery_key as _ensure_recovery_key
from pacsvault.backup.targets import _host as _host
from pacsvault.backup.targets import _kind as _kind
from pacsvault.backup.targets import _master as _master
from pacsvault.backup.targets import _repo as _repo
from pacsvault.backup.targets import _repository_password as _repository_password
from pacsvault.backup.targets import _target as _target
from pacsvault.backup.targets import has_recovery_password as has_recovery_password
from pacsvault.backup.targets import init as init
from pacsvault.backup.targets import set_recovery_code as set_recovery_code

if TYPE_CHECKING:
    from pacsvault.vault import Vault


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


# --- keystore snapshots ----------------------------------------------------------------


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


def _dump_index(vault: Vault, target: config.BackupTarget, staged: _Staged) -> str:
    """PostgreSQL (issue 16): the index dump of the staged point in time, streamed into
    the target (``backup.pgindex``), tagged with the run; returns its snapshot id."""
    assert staged.point is not None
    repo = _repo(vault, target)
    repo.unlock()
    _ensure_recovery_key(vault, target, repo)
    tools = pgindex.PgTools(vault.settings.backup.pg_bin_dir)
    summary = repo.backup_stream(
        pgindex.dump_chunks(vault, staged.point, tools, staged.dump_major),
        pgindex.DUMP_FILE, tags=[TAG_ALL, TAG_INDEX, staged.run_tag],
        host=_host(vault.vault_id))
    return str(summary.get("snapshot_id") or "")


def _backup_one(vault: Vault, target: config.BackupTarget, staged: _Staged,
                dumped: str | Exception | None = None) -> BackupOutcome:
    started = time.monotonic()
    try:
        if isinstance(dumped, Exception):
            raise dumped
        repo = _repo(vault, target)
        repo.unlock()  # stale locks of a run killed with serve (ours hold the flock)
        # A key rotation since the last run replaced the recovery password: the new code's
        # key goes in before the first snapshot whose vault.json only that code opens.
        _ensure_recovery_key(vault, target, repo)
        root = vault.layout.root
        summary = repo.backup(
            list(staged.paths), cwd=root, tags=[TAG_ALL, TAG_DATA, staged.run_tag],
            host=_host(vault.vault_id),
            # restic matches excludes against the absolute path it resolved from cwd
            excludes=[str(vault.layout.objects.resolve() / ".tmp"),
                      str(vault.layout.objects.resolve() / ".spare")])
        _push_keystore(vault, repo, target.name)
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
    dumps: dict[str, str | Exception] = {}
    try:
        staged: _Staged | None = _stage(vault)
        failure = ""
    except (OSError, sqlcipher3.Error, BackupError) as exc:
        staged = None
        failure = str(exc) if isinstance(exc, BackupError) else \
            f"the vault could not be copied for backup ({type(exc).__name__})"
    try:
        if staged is not None and staged.point is not None:
            try:  # every target's dump first: the exported snapshot is then released
                for target in chosen:
                    try:
                        dumps[target.name] = _dump_index(vault, target, staged)
                    except (ResticError, BackupError, OSError) as exc:
                        dumps[target.name] = exc
            finally:
                staged.close()
        if staged is not None and staged.mirror is not None:
            try:
                s3objects.sync(vault, staged.mirror)
            except (BackupError, OSError) as exc:  # (dumps made: forgotten at prune)
                staged, failure = None, (str(exc) if isinstance(exc, BackupError) else
                                         f"the objects could not be copied for backup "
                                         f"({type(exc).__name__})")
        for target in chosen:
            if staged is None:
                outcome = BackupOutcome(target.name, False, None, failure, 0, 0,
                                        round(time.monotonic() - started, 3))
            else:
                outcome = _backup_one(vault, target, staged, dumps.get(target.name))
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
        if staged is not None:
            staged.close()
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
            _forget_unused_dumps(repo)
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


def _forget_unused_dumps(repo: Repository) -> None:
    """PostgreSQL index dumps (tag ``pg-index``) whose run has no data snapshot left: the
    retention forgot that run, or its data snapshot failed."""
    found = repo.snapshots()
    runs = {t for s in found if _kind(s) == TAG_DATA for t in s.get("tags") or []
            if str(t).startswith("run-")}
    unused = [str(s["id"]) for s in found if _kind(s) == TAG_INDEX
              and not runs & {str(t) for t in s.get("tags") or []}]
    repo.forget(unused)


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
