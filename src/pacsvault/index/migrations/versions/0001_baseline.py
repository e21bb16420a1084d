"""Baseline: the index as pacsvault laid it out when schema versions began (issue 15).

Every table the models define (index, accounts, node certificates, erasure requests,
preferences: the caller passes them, already imported, in ``tables``). A vault made before
versions existed is brought to this layout by ``index.schema.legacy_baseline`` (the old
idempotent ``ensure_*`` upgrades) and stamped here, so this revision only ever runs on an
empty database; it creates what is missing and never drops anything.
"""

from __future__ import annotations

from alembic import context, op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables = context.config.attributes["tables"]
    bind = op.get_bind()
    for table in tables:
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    raise NotImplementedError("the baseline is not undone: restore a backup instead")
