"""The vault's index schema: every table of its layout, and bringing an older index to
this code's version after the operator agreed (``schema``: Alembic).

Apart from ``vault`` (which opens the index and calls ``upgrade_index``) to keep that
module small; ``vault`` re-exports the names its callers use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, Table

from pacsvault import vaultfile
from pacsvault.index import schema
from pacsvault.vaultfile import VaultError


def layout_tables() -> list[Table]:
    """Every table of the index layout, their model modules imported (erasure requests
    bring the storage stack: only when a vault is made or upgraded)."""
    import pacsvault.sharing.links  # share_links (issue 19)
    import pacsvault.storage.erasure_requests  # noqa: F401  (registers its table)
    from pacsvault.index.models import Base

    return list(Base.metadata.sorted_tables)


UpgradeConfirm = Callable[[schema.Plan], bool]


def confirm_upgrade(plan: schema.Plan) -> bool:
    """Say what is about to change, in one line; at a terminal ask first (unless
    ``PACSVAULT_UPGRADE=yes``); without one (systemd, scripts) go ahead: the upgrade is
    recorded in the trail (``index.upgraded``)."""
    import sys

    print(f"pacsvault: {plan.describe()}", file=sys.stderr)
    if os.environ.get("PACSVAULT_UPGRADE", "").lower() == "yes" or not sys.stdin.isatty():
        return True
    try:
        answer = input("upgrade now? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def upgrade_without_asking(plan: schema.Plan) -> bool:
    """``serve --yes``: the same one line, no question."""
    import sys

    print(f"pacsvault: {plan.describe()}", file=sys.stderr)
    return True


def upgrade_index(meta: Path, engine: Engine,
                  confirm: UpgradeConfirm | None) -> schema.Plan | None:
    """Bring the index (and ``vault.json``'s ``layout``) to this code's version, after
    ``confirm`` agreed; None when nothing had to change."""
    try:
        todo = schema.plan(engine)
    except schema.SchemaTooNew as exc:
        engine.dispose()
        raise VaultError(str(exc)) from None
    if todo is not None:
        if not (confirm or confirm_upgrade)(todo):
            engine.dispose()
            raise VaultError("the index upgrade was declined; nothing was changed")
        schema.upgrade(engine, layout_tables())
    if vaultfile.read(meta).get("layout") != schema.LAYOUT:
        with contextlib.suppress(OSError):  # a read-only disk still opens
            vaultfile.update(meta, lambda m: m.__setitem__("layout", schema.LAYOUT))
    return todo
