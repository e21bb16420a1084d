"""Share links (issue 19, part 2): the ``share_links`` table (``sharing.links``).

One row per link: SHA-256 digests of the link id and of the share session, the Argon2id
hash of the one-time code, the owner, times as microseconds, the grant and profile, the
counters; the study UID is a ``Sealed`` column (text on SQLite, whose whole file is
encrypted; AES-GCM bytes on PostgreSQL).

Written out as at this revision. Idempotent: the baseline makes a new index's tables from
the current models (this one included), and a pre-versioned vault gets it from
``legacy_baseline``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _links(sealed: sa.types.TypeEngine[Any]) -> sa.Table:
    return sa.Table(
        "share_links", sa.MetaData(),
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("link_key", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("owner", sa.String(64), nullable=False, index=True),
        sa.Column("study", sealed, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger, nullable=False),
        sa.Column("download", sa.Boolean, nullable=False),
        sa.Column("deidentify", sa.String(32), nullable=False),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("code_hash", sa.Text, nullable=False),
        sa.Column("session_key", sa.LargeBinary(32), nullable=True),
        sa.Column("revoked", sa.BigInteger, nullable=True),
        sa.Column("revoked_by", sa.String(64), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("openings", sa.Integer, nullable=False),
        sa.Column("last_opened", sa.BigInteger, nullable=True),
    )


def upgrade() -> None:
    bind = op.get_bind()
    sealed: sa.types.TypeEngine[Any] = (
        sa.Text() if bind.dialect.name == "sqlite" else sa.LargeBinary())
    _links(sealed).create(bind, checkfirst=True)


def downgrade() -> None:
    _links(sa.Text()).drop(op.get_bind(), checkfirst=True)
