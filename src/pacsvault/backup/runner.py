"""Backup runs, verification, retention and restore (public API; stubs being filled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


@dataclass(frozen=True)
class RestoreResult:
    data_dir: Path
    key_file: Path | None
    snapshot: str
    instances: int
    keys_restored: int


def run_backup(vault: Vault, targets: list[str] | None = None) -> list[BackupOutcome]:
    raise NotImplementedError


def verify(vault: Vault, target: str, read_data: bool = True) -> BackupOutcome:
    raise NotImplementedError


def prune(vault: Vault, target: str) -> BackupOutcome:
    raise NotImplementedError


def list_snapshots(vault: Vault, target: str) -> list[SnapshotInfo]:
    raise NotImplementedError


def restore(repository: str, credentials_file: Path | None, recovery_code: str | None,
            to: Path, key_file: Path, snapshot: str = "latest", *,
            password: bytes | None = None) -> RestoreResult:
    raise NotImplementedError


def keys_destroyed(vault: Vault) -> dict[str, str]:
    raise NotImplementedError


def recovery_code_changed(vault: Vault, code: str) -> None:
    raise NotImplementedError
