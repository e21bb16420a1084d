"""Blind tokens of a sealed index (issue 16, part 1): one table per level, each token
going with its row (``ON DELETE CASCADE``), written only when the index encrypts its
columns (PostgreSQL; ``index.blind``). On SQLite they stay empty.

Written out as they are at this revision (a later change of the models must not change
what this step makes). ``checkfirst``: a vault from before versions gets every table of
the models from ``legacy_baseline`` before it is stamped, so they may exist already.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_LEVELS = (("patient_tokens", "patients"), ("study_tokens", "studies"),
           ("series_tokens", "series"))


def _tables() -> list[sa.Table]:
    meta = sa.MetaData()
    sa.Table("patients", meta, sa.Column("pk", sa.Integer, primary_key=True))
    sa.Table("studies", meta, sa.Column("pk", sa.Integer, primary_key=True))
    sa.Table("series", meta, sa.Column("pk", sa.Integer, primary_key=True))
    return [
        sa.Table(
            name, meta,
            sa.Column("token", sa.LargeBinary(16), primary_key=True),
            sa.Column("row_pk", sa.Integer,
                      sa.ForeignKey(f"{parent}.pk", ondelete="CASCADE"),
                      primary_key=True, index=True),
        )
        for name, parent in _LEVELS
    ]


def upgrade() -> None:
    bind = op.get_bind()
    for table in _tables():
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(_tables()):
        table.drop(bind, checkfirst=True)
