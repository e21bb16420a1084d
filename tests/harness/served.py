"""One vault served by the real ``pacsvault serve`` for a whole test module.

Why here: several modules set up the same thing before their first test (a new vault,
its nodes registered through the CLI, a few settings, the server started on loopback,
stopped at the end; their TLS peers trust the vault's CA) and only the nodes, settings
and one preparation step differ. Unlike the rest of the harness, this module is for the
tests only (it runs the pacsvault CLI through ``tests.helpers``); the benchmarks do not
import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import Server, VaultDir, make_vault, start_server

# A node as ``pacsvault node add`` takes it: AE title, extra flags, host.
Node = tuple[str, tuple[str, ...], str]


@dataclass
class Served:
    vault: VaultDir
    server: Server

    @property
    def ca(self) -> Path:
        """The vault's CA certificate: what a TLS peer or a browser is told to trust."""
        return self.vault.data / "tls" / "ca.crt"


@contextlib.contextmanager
def served_vault(root: Path, *, nodes: Sequence[Node] = (),
                 settings: Mapping[str, Mapping[str, str]] | None = None,
                 prepare: Callable[[VaultDir], object] | None = None) -> Iterator[Served]:
    """A new vault in ``root``: ``settings`` written into its toml (section -> key -> TOML
    value), ``nodes`` registered through the CLI, as an administrator would (in parallel:
    each run is mostly interpreter start-up), then ``prepare`` run, then the server
    started; stopped when the block ends."""
    vault = make_vault(root)
    for section, values in (settings or {}).items():
        for key, value in values.items():
            vault.set_toml(section, key, value)
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda node: vault.add_node(node[0], *node[1], host=node[2]), nodes))
    if prepare is not None:
        prepare(vault)
    server = start_server(vault)
    try:
        yield Served(vault, server)
    finally:
        server.stop()
