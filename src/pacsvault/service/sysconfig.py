"""Where the vault is: ``--data``, else ``$PACSVAULT_DATA``, else the system configuration
``/etc/pacsvault/pacsvault.toml`` (``$PACSVAULT_CONFIG`` overrides that path, for tests).

Never the working directory: the default used to be ``./pacsvault-data``, so ``serve``
started from another directory silently created a second, empty vault with a new key and
a new administrator (issue 12). The system file is written by ``pacsvault service
install`` and holds no secret::

    data_dir = "/var/lib/pacsvault"
    key_file = "/etc/pacsvault/keys/master.key"
    user = "pacsvault"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

SYSTEM_CONFIG = Path("/etc/pacsvault/pacsvault.toml")
CONFIG_ENV = "PACSVAULT_CONFIG"
DATA_ENV = "PACSVAULT_DATA"
OLD_DEFAULT = "pacsvault-data"


class SystemConfigError(Exception):
    """The system configuration file is unreadable (message is user-facing)."""


@dataclass(frozen=True)
class SystemConfig:
    path: Path
    data_dir: Path
    key_file: Path | None
    user: str | None


@dataclass(frozen=True)
class DataDir:
    """The data directory a command uses, and where that choice came from."""

    path: Path  # absolute
    source: str  # "--data", "PACSVAULT_DATA" or the system config's path
    key_file: Path | None  # the system config's key file, when it names this data dir


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or SYSTEM_CONFIG)


def load_system(path: Path | None = None) -> SystemConfig | None:
    """The system configuration, or None when there is none."""
    path = path or config_path()
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except PermissionError:
        raise SystemConfigError(
            f"{path} is not readable by this user: run the command as the service user "
            "(e.g. 'sudo -u pacsvault pacsvault ...') or pass --data") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SystemConfigError(f"{path}: {exc}") from None
    data = raw.get("data_dir")
    key = raw.get("key_file")
    user = raw.get("user")
    if not isinstance(data, str) or not data.startswith("/"):
        raise SystemConfigError(f"{path}: data_dir must be an absolute path")
    if key is not None and (not isinstance(key, str) or not key.startswith("/")):
        raise SystemConfigError(f"{path}: key_file must be an absolute path")
    if user is not None and not isinstance(user, str):
        raise SystemConfigError(f"{path}: user must be a string")
    return SystemConfig(path, Path(data), Path(key) if key else None, user)


def resolve(flag: Path | None) -> DataDir | None:
    """The data directory to use, or None when nothing names one."""
    explicit = flag is not None or bool(os.environ.get(DATA_ENV))
    try:
        system = load_system()
    except SystemConfigError:
        if not explicit:
            raise
        system = None  # a broken system file does not stop a command given its data dir
    if flag is not None:
        chosen, source = Path(flag), "--data"
    elif os.environ.get(DATA_ENV):
        chosen, source = Path(os.environ[DATA_ENV]), DATA_ENV
    elif system is not None:
        chosen, source = system.data_dir, str(system.path)
    else:
        return None
    path = Path(os.path.abspath(chosen))
    key = system.key_file if system is not None and system.data_dir == path else None
    return DataDir(path, source, key)


def guidance() -> str:
    """What to do when no data directory is configured (one paragraph)."""
    here = Path.cwd() / OLD_DEFAULT
    old = ""
    if (here / "vault.json").exists():
        old = (f" A vault exists in {here}: use it with --data {here} (or "
               f"PACSVAULT_DATA={here}).")
    return (
        "no data directory is configured, and pacsvault never picks one in the current "
        f"directory (nothing was created).{old} For a server, run 'pacsvault service "
        f"install' as root: it creates /var/lib/pacsvault and {SYSTEM_CONFIG}. To try "
        "it out, create a vault with 'pacsvault init --data DIR' and pass --data DIR (or "
        f"set {DATA_ENV}=DIR) to every command."
    )
