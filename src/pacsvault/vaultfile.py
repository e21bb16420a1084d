"""``vault.json``: read with its checks, changed atomically.

Its own module, below the workflows that change it (key rotation, sealed material, the
retention job): they write the file without importing the ``Vault`` that opens it, so
no import circle runs through ``vault.py``.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

import platformdirs

from pacsvault.fsutil import write_atomic
from pacsvault.index import schema

VAULT_FORMAT = "pacsvault-vault/1"
META_NAME = "vault.json"
BACKUP_RECOVERY_SECRET = "backup-recovery-password"  # noqa: S105 (a named secret, backup/)


def default_key_path(vault_id: str) -> Path:
    """Where a vault's key file lives when the settings name none: the user's config
    directory, never the data directory (a backup of one must not carry the other)."""
    return platformdirs.user_config_path("pacsvault") / "keys" / f"{vault_id}.key"


class VaultError(Exception):
    """The vault cannot be created or opened (message is user-facing)."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return f"pacsvault {dist_version('pacsvault')}"
    except PackageNotFoundError:
        return "pacsvault"


def read(path: Path) -> dict[str, object]:
    """``vault.json`` at ``path`` (the data directory's), checked: present, JSON, this
    format, a layout this code knows."""
    try:
        meta: dict[str, object] = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise VaultError(f"no vault at {path.parent} ({META_NAME} missing)") from None
    except ValueError:  # not JSON, not UTF-8: a damaged file, not a traceback (issue 12)
        raise VaultError(f"{path} is damaged (not the JSON pacsvault wrote); restore "
                         "it from a backup") from None
    if not isinstance(meta, dict):
        raise VaultError(f"{path} is damaged (not the JSON pacsvault wrote); restore "
                         "it from a backup")
    if meta.get("format") != VAULT_FORMAT:
        raise VaultError(f"{path}: unsupported vault format {meta.get('format')!r}")
    layout = meta.get("layout", 1)
    if not isinstance(layout, int) or layout > schema.LAYOUT:
        raise VaultError(f"this vault was upgraded by a newer pacsvault (vault layout "
                         f"{layout!r}, this {version()} knows up to {schema.LAYOUT}); "
                         "install it")
    return meta


DEFAULT_INSTANCE = "main"
_INSTANCE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def valid_instance(name: str) -> bool:
    """An instance name (``instance add``): lowercase letters, digits and dashes, at most
    32, so it is safe in a table key, a log line and a file name."""
    return bool(_INSTANCE_NAME.match(name))


def instance(path: Path) -> str:
    """The instance this data directory is (``vault.json`` ``instance``): several data
    directories of one vault share its index and each keeps its own audit chain under this
    name. "main" for a vault that never had another (no migration of ``vault.json``)."""
    name = read(path).get("instance", DEFAULT_INSTANCE)
    if not isinstance(name, str) or not valid_instance(name):
        raise VaultError(f"{path}: invalid instance name {name!r}")
    return name


_LOCK = threading.Lock()
_generation = 0  # bumped by every update: a copy read before it is stale


def generation() -> int:
    return _generation


def update(path: Path, change: Callable[[dict[str, object]], None]) -> dict[str, object]:
    """Change ``vault.json`` atomically (write a 0600 sibling, fsync, rename, fsync the
    directory): a crash leaves the old or the new file, never half of one. One writer per
    process at a time; writers in other processes (CLI vs serve) are rare admin actions."""
    global _generation
    with _LOCK:
        meta = read(path)
        change(meta)
        write_atomic(path, json.dumps(meta, indent=2).encode("utf-8"))
        _generation += 1
        return meta


def signature(path: Path) -> tuple[int, ...] | None:
    """Changes when any process replaces ``vault.json`` (a new file renamed over it)."""
    with contextlib.suppress(OSError):
        info = path.stat()
        return (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)
    return None
