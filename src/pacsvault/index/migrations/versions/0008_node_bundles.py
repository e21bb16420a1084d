"""TLS node bundles in the index (issue 16, part 3): ``node_bundles`` (``web.node_bundle``,
``index.deployment_state``), one row per node whose certificate bundle waits for its single
download: the SHA-256 of the AE title, the issue time in microseconds, the body (the
certificates and the private keys encrypted with the vault's TLS key password). Until now a
file under ``DATA/tls/pending``: issued on one instance, it was gone for a download that the
load balancer sent to another.

Written out as at this revision; idempotent (``checkfirst``). Pending files of an older
version are not imported: they expire within a day and a new bundle is one click.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _table() -> sa.Table:
    return sa.Table(
        "node_bundles", sa.MetaData(),
        sa.Column("node", sa.LargeBinary(32), primary_key=True),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )


def upgrade() -> None:
    _table().create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    _table().drop(op.get_bind(), checkfirst=True)
