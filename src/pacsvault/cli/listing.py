"""The listing commands' shape (``user list``, ``node list``, ``object list``, ...): read one
thing from the vault, close it, then print a table, or one line on stderr when it is empty."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TypeVar

from pacsvault.cli.common import open_vault, say
from pacsvault.vault import Vault

T = TypeVar("T")


def read_vault(args: argparse.Namespace, use: Callable[[Vault], T]) -> T:
    """``use(vault)`` on the vault opened from ``args``, closed again whatever happens: the
    listing commands read one thing and print it after the vault is closed."""
    vault = open_vault(args)
    try:
        return use(vault)
    finally:
        vault.close()


def print_table(items: Sequence[T], *, empty: str, header: str,
                row: Callable[[T], str]) -> int:
    """A listing: ``empty`` on stderr when there is nothing, else the header and one
    ``row`` per item on stdout (what scripts read); the exit code is 0 either way."""
    if not items:
        say(empty)
        return 0
    print(header)
    for item in items:
        print(row(item))
    return 0
