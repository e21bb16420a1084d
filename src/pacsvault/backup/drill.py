"""Restore drills: prove, regularly and without anyone's help, that a backup would work.

A backup nobody has restored is a hope. The drill does what a practice would do after
losing its server, on this machine, into a throw-away directory:

1. restore the target's latest snapshot (``runner.restore``) into a fresh 0700 directory
   (``.pacsvault-drill-*`` beside the data directory, else in ``/var/tmp``): ciphertext
   only, like the data directory itself. The repository is opened with the password
   derived from the recovery code (named secret ``backup-recovery-password``), which
   proves the recovery code's key is in the repository; a PostgreSQL index (issue 16)
   is restored into a scratch database on its own server (``<db>_drill_<hex>``, made
   and dropped by the drill: the index role needs CREATEDB);
2. open the copy with the live master key held in memory (``Vault.open_copy``: the copy's
   ``key_check`` must verify under it); the keystore snapshot is merged by the restore;
3. decrypt and authenticate every indexed object (a crypto-shredded patient's objects are
   counted apart: unreadable on purpose), verify the whole audit trail (chain, anchor and
   every signature), and compare the number of instances with the snapshot's own count;
4. record a ``backup.drill`` event (counts only, never patient data) and the result in the
   state file, and delete the copy, always, failure or not.

A copy left behind by a process that died mid-drill is deleted by the next drill or
scheduler tick (:func:`remove_stale`): each copy holds an ``flock`` while in use, so a
drill running from the command line is never deleted under it by the server's tick.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.config.index import IndexSettings

if TYPE_CHECKING:
    from pacsvault.vault import Layout, Vault

log = logging.getLogger("pacsvault.backup")

PREFIX = ".pacsvault-drill-"
LOCK_NAME = ".drill.lock"
FALLBACK_DIR = Path("/var/tmp")  # noqa: S108 (a 0700 directory of our own inside)
SPACE_MARGIN = 1.2  # free space wanted: the archive's size times this, plus 64 MiB


class DrillError(Exception):
    """The drill could not be made or did not verify (message: one line, no patient data)."""


@dataclass
class DrillResult:
    target: str
    ok: bool
    snapshot: str = ""
    instances: int = 0  # rows in the restored index
    expected: int | None = None  # the snapshot's own count (from the restore)
    verified: int = 0  # objects that decrypted and authenticated
    shredded: int = 0  # objects whose patient key was destroyed on purpose
    failed: int = 0  # objects missing or not authenticating
    keys_restored: int = 0
    trail_records: int = 0
    seconds: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)

    def detail(self) -> dict[str, str | int | bool]:
        found: dict[str, str | int | bool] = {
            "target": self.target, "ok": self.ok, "snapshot": self.snapshot,
            "instances": self.instances, "verified": self.verified,
            "shredded": self.shredded, "failed": self.failed,
            "keys_restored": self.keys_restored, "trail_records": self.trail_records,
            "seconds": round(self.seconds),
        }
        if self.expected is not None:
            found["expected"] = self.expected
        if self.error:
            found["error"] = self.error[:300]
        return found

    def summary(self) -> str:
        """One line for the state file and the Health page."""
        if self.ok:
            return (f"{self.verified} object(s) authenticated"
                    + (f", {self.shredded} erased on purpose" if self.shredded else "")
                    + f", trail of {self.trail_records} record(s) verified")
        return self.error or "failed"


def _candidates(layout: Layout) -> list[Path]:
    return [layout.root.resolve().parent, FALLBACK_DIR]


def _needed_bytes(vault: Vault) -> int:
    try:
        stored = sum(f.stat().st_size for f in vault.layout.root.rglob("*") if f.is_file())
    except OSError:
        stored = 0
    return int(stored * SPACE_MARGIN) + 64 * 1024 * 1024


def _place(vault: Vault) -> Path:
    """The first candidate directory with room for a whole copy of the vault."""
    needed = _needed_bytes(vault)
    for parent in _candidates(vault.layout):
        try:
            if os.access(parent, os.W_OK | os.X_OK) and \
                    shutil.disk_usage(parent).free >= needed:
                return parent
        except OSError:
            continue
    raise DrillError(f"no room for a restore drill: {needed // (1024 * 1024)} MB needed "
                     f"beside the data directory or in {FALLBACK_DIR}")


@contextlib.contextmanager
def _workspace(vault: Vault) -> Iterator[Path]:
    """A fresh 0700 directory, locked while in use, deleted afterwards whatever happens."""
    parent = _place(vault)
    work = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    os.chmod(work, 0o700)
    fd = os.open(work / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)


def remove_stale(layout: Layout) -> int:
    """Delete drill copies left by a process that died mid-drill (their lock is free)."""
    removed = 0
    for parent in _candidates(layout):
        try:
            found = [p for p in parent.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
        except OSError:
            continue
        for path in found:
            try:
                fd = os.open(path / LOCK_NAME, os.O_RDONLY)
            except FileNotFoundError:
                fd = -1  # made but not yet locked, or half deleted: check its age
            except OSError:
                continue
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue  # in use by a running drill
                elif time.time() - path.stat().st_mtime < 3600:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            except OSError:
                continue
            finally:
                if fd >= 0:
                    os.close(fd)
    if removed:
        log.warning("removed %d restore drill cop(ies) left by an interrupted drill", removed)
    return removed


def _check_copy(vault: Vault, data: Path, result: DrillResult) -> None:
    """Open the restored copy with the live key; authenticate every object; verify the
    trail. Fills ``result``; raises ``DrillError`` on the first structural failure."""
    from pacsvault.crypto.keyring import KeyDestroyed
    from pacsvault.crypto.objects import ObjectFormatError

    try:
        copy = vault.open_copy(data)
    except Exception as exc:
        raise DrillError(f"the restored copy does not open with the live key: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        archive = copy.archive
        for item in archive.locate():
            result.instances += 1
            try:
                archive.data_key(item.key_id)  # erased on purpose: no key, no file needed
            except KeyDestroyed:
                result.shredded += 1
                continue
            try:
                archive.read(item)
                result.verified += 1
            except (ObjectFormatError, OSError, ValueError):
                result.failed += 1
        verdict = copy.audit.verify()
        result.trail_records = verdict.records
        if not verdict.ok:
            result.problems.append(f"the restored audit trail does not verify: "
                                   f"{verdict.problem[:200]}")
    finally:
        copy.close()
    if result.failed:
        result.problems.insert(0, f"{result.failed} of {result.instances} restored object(s) "
                                  "are missing or do not authenticate")
    if result.expected is not None and result.expected != result.instances:
        result.problems.append(f"the snapshot counted {result.expected} instance(s), the "
                               f"restored index has {result.instances}")


def run_drill(vault: Vault, target: str) -> DrillResult:
    """Restore ``target``'s latest snapshot, verify it, record the result, delete the copy.

    Never raises for a drill that fails (the failure is the result, recorded and alerted);
    raises ``DrillError`` only for a target that is not configured.
    """
    from pacsvault.backup import runner
    from pacsvault.backup.targets import recovery_key_behind

    configured = {t.name: t for t in vault.settings.backup.targets}
    if target not in configured:
        raise DrillError(f"no backup target named {target!r}; configured: "
                         f"{', '.join(configured) or 'none'}")
    spec = configured[target]
    remove_stale(vault.layout)
    result = DrillResult(target=target, ok=False)
    started = time.monotonic()
    try:
        password = _recovery_password(vault)
        if recovery_key_behind(vault, spec):
            raise DrillError(
                "the recovery code changed (key rotation) after this target's last backup: "
                "its snapshots open with the old code only; the next backup (at once in "
                "'serve', or 'pacsvault backup run') makes one the new code opens, then "
                "drill again")
        with _workspace(vault) as work, _scratch_index(vault) as to_index:
            restored = runner.restore(
                spec.repository,
                Path(spec.credentials_file) if spec.credentials_file else None,
                None, work / "data", None, "latest", password=password,
                master=runner._master(vault), binary=vault.settings.backup.restic_binary,
                to_index=to_index, pg_bin_dir=vault.settings.backup.pg_bin_dir,
            )
            result.snapshot = str(restored.snapshot)[:64]
            result.expected = restored.instances
            result.keys_restored = restored.keys_restored
            _check_copy(vault, restored.data_dir, result)
        result.ok = not result.problems
        if result.problems:
            result.error = "; ".join(result.problems)
    except DrillError as exc:
        result.error = str(exc)
    except Exception as exc:  # restic refused, disk full...: the drill failed, say why
        result.error = f"restore failed: {_one_line(str(exc)) or type(exc).__name__}"
    result.seconds = time.monotonic() - started
    _record(vault, result)
    return result


@contextlib.contextmanager
def _scratch_index(vault: Vault) -> Iterator[IndexSettings | None]:
    """PostgreSQL (issue 16): a scratch database on the index's own server for the
    restored index, dropped after the drill whatever happens; None for an embedded index
    (it is a file of the copy)."""
    settings = vault.settings.index
    if not settings.is_postgres:
        yield None
        return
    from pacsvault.backup import pgindex

    with pgindex.scratch_database(settings) as name:
        yield IndexSettings(url=pgindex.conninfo(settings, name),
                            password_file=settings.password_file,
                            pool_size=2, max_overflow=2)


def _recovery_password(vault: Vault) -> bytes:
    """The repository password derived from the recovery code, as the vault keeps it.

    Read, never made: ``named_secret`` would invent a random one for a vault made before
    backups, and a drill with it would prove nothing. Without it a new machine could not
    open the repository with the recovery sheet, which is exactly what a drill must say.
    """
    import json

    from pacsvault.vaultfile import BACKUP_RECOVERY_SECRET

    try:
        meta = json.loads(vault.layout.meta.read_text("utf-8"))
    except (OSError, ValueError):
        meta = {}
    table = meta.get("secrets") if isinstance(meta, dict) else None
    if not (isinstance(table, dict) and isinstance(table.get(BACKUP_RECOVERY_SECRET), str)):
        raise DrillError("the vault holds no recovery-code password for the backup "
                         "repositories: run 'pacsvault backup init' (it asks for the "
                         "recovery code once)")
    return vault.named_secret(BACKUP_RECOVERY_SECRET)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line[:limit] + ("..." if len(line) > limit else "")


def _record(vault: Vault, result: DrillResult) -> None:
    from pacsvault.backup.state import record_drill

    if result.ok:
        log.info("restore drill of target %s succeeded: %s", result.target, result.summary())
    else:
        log.error("restore drill of target %s FAILED: %s", result.target, result.error)
    try:
        vault.recorder.emit(AuditEvent(
            action="backup.drill",
            outcome=Outcome.SUCCESS if result.ok else Outcome.SERIOUS_FAILURE,
            code=EventCode.APPLICATION_ACTIVITY if result.ok else EventCode.SECURITY_ALERT,
            message=(f"restore drill of target {result.target}: "
                     + ("succeeded" if result.ok else _one_line(result.error))),
            detail=result.detail(),
        ))
    finally:
        record_drill(vault.layout, result.target, result.ok, _one_line(result.summary()))
