"""Deployment-wide state in the index (issue 16, part 3): ``vault_secrets`` (the named
secrets every instance must share, ``Sealed``), ``breach_versions`` (the breach register,
each version an AES-GCM blob, unique per breach and version) and ``deidentify_links``
(de-identification link lines: keyed digests plus an AES-GCM blob, unique per project and
pseudonym), from ``index.deployment_state``.

Written out as at this revision. Idempotent (``checkfirst``): the baseline makes a new
index's tables from the current models, this one included. The files these replace
(``DATA/breaches``, ``DATA/deidentify/*.links``) are imported by their stores on first use
(they need the vault's keys, which a revision does not have).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _tables(sealed: sa.types.TypeEngine[Any]) -> list[sa.Table]:
    meta = sa.MetaData()
    return [
        sa.Table(
            "vault_secrets", meta,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("secret", sealed, nullable=False),
        ),
        sa.Table(
            "breach_versions", meta,
            sa.Column("pk", sa.Integer, primary_key=True),
            sa.Column("breach_id", sa.String(32), nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("blob", sa.LargeBinary, nullable=False),
            sa.UniqueConstraint("breach_id", "version",
                                name="uq_breach_versions_breach_id_version"),
        ),
        sa.Table(
            "deidentify_links", meta,
            sa.Column("pk", sa.Integer, primary_key=True),
            sa.Column("project", sa.LargeBinary(16), nullable=False),
            sa.Column("pseudonym", sa.LargeBinary(32), nullable=False),
            sa.Column("patient", sa.LargeBinary(32), nullable=False),
            sa.Column("blob", sa.LargeBinary, nullable=False),
            sa.UniqueConstraint("project", "pseudonym",
                                name="uq_deidentify_links_project_pseudonym"),
            sa.Index("ix_deidentify_links_patient", "patient"),
        ),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    sealed: sa.types.TypeEngine[Any] = (
        sa.Text() if bind.dialect.name == "sqlite" else sa.LargeBinary())
    for table in _tables(sealed):
        table.create(bind, checkfirst=True)


def downgrade() -> None:
    for table in reversed(_tables(sa.Text())):
        table.drop(op.get_bind(), checkfirst=True)
