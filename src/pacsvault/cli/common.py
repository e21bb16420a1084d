"""What every command shares: --data, --key-file, opening the vault, user-facing errors."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pacsvault.audit.alerts import AlertConfigError
from pacsvault.audit.syslog import SyslogConfigError
from pacsvault.config import ConfigError
from pacsvault.crypto.keys import VaultKeyError
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
    return found.path


def open_vault(args: argparse.Namespace) -> Vault:
    return Vault.open(data_dir(args), getattr(args, "key_file", None))


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
