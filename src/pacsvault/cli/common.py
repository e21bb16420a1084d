"""What every command shares: --data, --key-file, opening the vault, user-facing errors."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pacsvault.audit.alerts import AlertConfigError
from pacsvault.audit.syslog import SyslogConfigError
from pacsvault.config import ConfigError, default_data_dir
from pacsvault.crypto.keys import VaultKeyError
from pacsvault.index.db import IndexOpenError
from pacsvault.index.nodes import NodeError
from pacsvault.vault import Vault, VaultError

USER_ERRORS = (
    VaultError, VaultKeyError, ConfigError, IndexOpenError, NodeError, AlertConfigError,
    SyslogConfigError,
)


class CommandError(Exception):
    """A user-facing failure of a command (printed without a traceback)."""


def add_data_args(parser: argparse.ArgumentParser, *, key_file: bool = True) -> None:
    parser.add_argument(
        "--data", type=Path, default=None,
        help="vault data directory (default: $PACSVAULT_DATA, else ./pacsvault-data)",
    )
    if key_file:
        parser.add_argument(
            "--key-file", type=Path, default=None,
            help="master key file (default: the one recorded in pacsvault.toml, else the "
            "user's config dir)",
        )


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data) if args.data else default_data_dir()


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
