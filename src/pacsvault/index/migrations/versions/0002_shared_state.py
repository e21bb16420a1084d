"""Shared state of several instances (issue 16, part 3): browser sessions, pending sign-ins,
WebAuthn challenges and sent alert notices move from one process's memory into the index.

The tables are written out here as they were at this revision (a later change of
``index.shared_state`` must not change what this step makes). ``checkfirst``: a vault from
before versions gets every table of the models from ``legacy_baseline`` before it is
stamped, so they may exist already.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _tables() -> list[sa.Table]:
    meta = sa.MetaData()
    return [
        sa.Table(
            "web_sessions", meta,
            sa.Column("key", sa.LargeBinary(32), primary_key=True),
            sa.Column("stage", sa.String(16), nullable=False),
            sa.Column("user", sa.String(64), nullable=False, index=True),
            sa.Column("address", sa.String(64), nullable=False),
            sa.Column("created", sa.BigInteger, nullable=False),
            sa.Column("last_seen", sa.BigInteger, nullable=False),
            sa.Column("enrolled", sa.Boolean, nullable=False),
            sa.Column("password_changed", sa.BigInteger, nullable=True),
            sa.Column("next", sa.Text, nullable=False),
            sa.Column("sealed", sa.LargeBinary, nullable=False),
            sa.Index("ix_web_sessions_stage_created", "stage", "created"),
        ),
        sa.Table(
            "sign_in_tickets", meta,
            sa.Column("key", sa.LargeBinary(32), primary_key=True),
            sa.Column("user_pk", sa.Integer, nullable=False),
            sa.Column("name", sa.String(64), nullable=False, index=True),
            sa.Column("address", sa.String(64), nullable=False),
            sa.Column("expires", sa.BigInteger, nullable=False, index=True),
            sa.Column("name_key", sa.String(64), nullable=False),
            sa.Column("source_address", sa.String(64), nullable=False),
            sa.Column("source_key", sa.String(80), nullable=False),
            sa.Column("familiar", sa.Boolean, nullable=False),
            sa.Column("known_device", sa.Boolean, nullable=False),
            sa.Column("sealed", sa.LargeBinary, nullable=False),
        ),
        sa.Table(
            "webauthn_challenges", meta,
            sa.Column("key", sa.LargeBinary(32), primary_key=True),
            sa.Column("challenge", sa.LargeBinary(64), nullable=False),
            sa.Column("rp_id", sa.String(255), nullable=False),
            sa.Column("rp_origin", sa.String(300), nullable=False),
            sa.Column("user_pk", sa.Integer, nullable=False),
            sa.Column("expires", sa.BigInteger, nullable=False, index=True),
        ),
        sa.Table(
            "alert_notices", meta,
            sa.Column("rule", sa.String(64), primary_key=True),
            sa.Column("subject", sa.String(255), primary_key=True),
            sa.Column("until", sa.BigInteger, nullable=False),
        ),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    for table in _tables():
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    for table in reversed(_tables()):
        table.drop(bind, checkfirst=True)
