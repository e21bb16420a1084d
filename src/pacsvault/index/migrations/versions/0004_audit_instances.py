"""Several instances, one trail (issue 16, part 3): ``audit_head`` gets an ``instance``
key (every existing row is the one instance a vault had, "main") and ``audit_lines``
keeps a copy of every record line an instance appends (``audit.instances``).

Written out as at this revision. Idempotent: the baseline makes the tables from the
current models for a new PostgreSQL index and a pre-versioned vault gets every table from
``legacy_baseline``, so the column, index or table may exist already.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _lines() -> sa.Table:
    return sa.Table(
        "audit_lines", sa.MetaData(),
        sa.Column("instance", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("line", sa.Text, nullable=False),
    )


def upgrade() -> None:
    bind = op.get_bind()
    found = sa.inspect(bind)
    if "instance" not in {c["name"] for c in found.get_columns("audit_head")}:
        # ADD COLUMN with a constant default: every existing row is "main" (SQLite and
        # PostgreSQL alike, no table copy).
        op.add_column("audit_head", sa.Column("instance", sa.String(64), nullable=True,
                                              server_default="main"))
        op.create_index("ix_audit_head_instance", "audit_head", ["instance"], unique=True)
    _lines().create(bind, checkfirst=True)


def downgrade() -> None:
    _lines().drop(op.get_bind(), checkfirst=True)
