"""A fresh vault per test at the cost of a copy, not of a CLI ``init``.

``make_vault`` runs the real ``pacsvault init`` (a process start, certificate and key
generation, the first administrator's argon2 hash): 3-4 s here, more on a loaded CI worker.
A module that needs a pristine, just-initialized vault in every test makes one template
with ``make_vault`` (once per module) and gives each test a byte-for-byte copy of it:
each test still gets a vault exactly as ``init`` leaves it (same files, modes, key file),
its own directory, nothing shared with another test.

What ties a vault to its directory: only ``key_file = "..."`` in pacsvault.toml (the index,
the audit trail, vault.json, TLS material hold no path; checked when this was written). The
copy's line names the copy's key file, so that a command run without ``--key-file``, and
``key recover`` to the recorded path, use the copy's key and never the template's.
Copies share the template's vault id, recovery code and first administrator: tests that
need two different vaults take copies of two templates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import AE, VaultDir, make_vault


def template(root: Path, ae_title: str = AE) -> VaultDir:
    """The template: a real ``init`` (use from a module-scoped fixture)."""
    return make_vault(root, ae_title=ae_title)


def copy_of(tpl: VaultDir, root: Path) -> VaultDir:
    """A copy of ``tpl`` at ``root`` (which must not exist), its key file recorded."""
    shutil.copytree(tpl.root, root, symlinks=True)  # copy2: modes kept (0600/0700 checked)
    key = root / tpl.key.relative_to(tpl.root)
    toml = root / "data" / "pacsvault.toml"
    old_line, new_line = f'key_file = "{tpl.key}"', f'key_file = "{key}"'
    text = toml.read_text()
    assert text.count(old_line) == 1, "the template's key_file line moved: update copy_of"
    toml.write_text(text.replace(old_line, new_line))
    return VaultDir(root, key, tpl.recovery_code, tpl.admin_password, tpl.admin_name)
