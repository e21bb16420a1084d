"""What every command shares: --data, --key-file, opening the vault, user-facing errors."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path

from pacsvault.config import ConfigError
from pacsvault.config.alerts import AlertConfigError
from pacsvault.config.syslog import SyslogConfigError
from pacsvault.crypto.keys import VaultKeyError
from pacsvault.crypto.protection import PassphraseProvider, passphrase_provider
from pacsvault.index.db import IndexOpenError
from pacsvault.index.nodes import NodeError
from pacsvault.service.sysconfig import SystemConfigError, guidance, resolve
from pacsvault.vault import Vault, VaultError

USER_ERRORS = (
    VaultError, VaultKeyError, ConfigError, IndexOpenError, NodeError, AlertConfigError,
    SyslogConfigError, SystemConfigError,
)


class CommandError(Exception):
    """A user-facing failure of a command (printed without a traceback)."""


def add_data_args(parser: argparse.ArgumentParser, *, key_file: bool = True) -> None:
    parser.add_argument(
        "--data", type=Path, default=None,
        help="vault data directory (default: $PACSVAULT_DATA, else data_dir of "
        "/etc/pacsvault/pacsvault.toml; never the current directory)",
    )
    if key_file:
        parser.add_argument(
            "--key-file", type=Path, default=None,
            help="master key file (default: the one recorded in pacsvault.toml, else the "
            "user's config dir)",
        )
        parser.add_argument(
            "--passphrase-file", type=Path, default=None,
            help="0600 file whose first line is the passphrase of a passphrase-protected "
            "key (default: $CREDENTIALS_DIRECTORY/pacsvault-passphrase, else asked at the "
            "terminal)",
        )


def data_dir(args: argparse.Namespace, *, announce: bool = True) -> Path:
    """The absolute data directory (``sysconfig.resolve``), or a refusal with guidance.

    A directory not typed on the command line is named on stderr, so nobody works on
    another vault than they think. The system configuration's key file becomes the default
    ``--key-file`` for its own data directory.
    """
    found = resolve(Path(args.data) if args.data else None)
    if found is None:
        raise CommandError(guidance())
    if found.key_file is not None and getattr(args, "key_file", "absent") is None:
        args.key_file = found.key_file
    if announce and found.source != "--data":
        say(f"pacsvault: data directory {found.path} (from {found.source})")
    _keep_owner(found.path)
    return found.path


def _keep_owner(root: Path) -> None:
    """Root working on the service's vault (``pacsvault node add`` typed as root): what
    the command creates there (a WAL file, a renewed ``crl.pem``, a trail lock) is given
    back to the vault's owner at exit, or the service could no longer open its own vault."""
    if os.geteuid() != 0:
        return
    try:
        info = root.stat()
    except OSError:
        return
    if info.st_uid != 0:
        atexit.register(_give_back, root, info.st_uid, info.st_gid)


def _give_back(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "objects" in dirnames:
            dirnames.remove("objects")  # written by the server only (and large)
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            try:
                if os.lstat(path).st_uid == 0:
                    os.lchown(path, uid, gid)
            except OSError:
                continue


def open_vault(args: argparse.Namespace) -> Vault:
    return Vault.open(data_dir(args), getattr(args, "key_file", None),
                      passphrase=passphrase_source(args))


def passphrase_source(args: argparse.Namespace) -> PassphraseProvider:
    """The master key's passphrase, asked only if the key file has one (crypto.protection)."""
    return passphrase_provider(getattr(args, "passphrase_file", None))


def setup_logging(verbose: bool = False) -> None:
    from pacsvault.logsafe import OneLineFormatter

    handler = logging.StreamHandler(sys.stderr)
    # One line per entry, peer-supplied text escaped, tracebacks condensed (logsafe).
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        handlers=[handler],
        force=True,
    )
    # pynetdicom at INFO/DEBUG can dump received datasets: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def say(text: str) -> None:
    print(text, file=sys.stderr)


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error a user's input caused (a path onto a file, into
    /proc, without permission): what, where, and what to check, never a traceback
    (issue 12, defect 6)."""
    where = exc.filename if isinstance(exc.filename, str) else ""
    what = exc.strerror or type(exc).__name__
    if isinstance(exc, PermissionError):
        import getpass

        hint = (f"no permission for user {getpass.getuser()}: run pacsvault as the vault's "
                "owner (the service user) or fix the path's permissions")
    elif isinstance(exc, NotADirectoryError):
        hint = "a part of this path is a file, not a folder"
    elif isinstance(exc, IsADirectoryError):
        hint = "this is a folder where a file was expected"
    elif isinstance(exc, FileExistsError):
        hint = "already exists and is in the way (a file where a folder is needed?)"
    elif isinstance(exc, FileNotFoundError):
        hint = "no such file or folder (or its folder cannot be created there)"
    else:
        hint = what
        what = ""
    return f"{where + ': ' if where else ''}{hint}" + (f" ({what})" if what else "")
