"""Token policy (issue 19): API tokens get a source network, a remote flag, the address of
their last use and an idle clock (``api_tokens``), and the addresses each was used from
(``api_token_sources``, so a use from a new address is an audit event).

Existing tokens are given the new limits, not revoked: a script keeps working, within them.
- Expiry: capped at 90 days (``[tokens] max_days``' default) *from the upgrade*: an old
  366-day token made last week now ends 90 days after the upgrade, a token ending sooner
  keeps its date. A practice that lowered ``max_days`` gets the smaller limit at the next
  creation; existing tokens keep the 90-day cap.
- Idle expiry: the idle clock starts at the upgrade (``active`` = now), so a token unused
  for months is not killed by the upgrade itself; it expires after ``idle_days`` more
  without use.
- Network: no source network (``""``) and not remote, so from now on it is refused outside
  the trusted networks even in internet mode; a remote script needs a new token made
  with ``--remote``.

Written out as at this revision, idempotent (the baseline makes a new index's tables from
the current models, which already have all this; a pre-versioned vault gets every table
from ``legacy_baseline``).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CAP = dt.timedelta(days=90)


def _sources() -> sa.Table:
    return sa.Table(
        "api_token_sources", sa.MetaData(),
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("token_pk", sa.Integer, nullable=False, index=True),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("token_pk", "address"),
    )


def _stored(value: dt.datetime, dialect: str) -> dt.datetime:
    """SQLite keeps naive UTC text (as ``UTCDateTime`` writes it); PostgreSQL an aware time."""
    value = value.astimezone(dt.UTC)
    return value.replace(tzinfo=None) if dialect == "sqlite" else value


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def upgrade() -> None:
    bind = op.get_bind()
    found = sa.inspect(bind)
    have = {c["name"] for c in found.get_columns("api_tokens")}
    added: list[sa.Column[object]] = [
        sa.Column("source_network", sa.String(64), nullable=True, server_default=""),
        sa.Column("remote", sa.Boolean, nullable=True, server_default=sa.false()),
        sa.Column("last_address", sa.String(64), nullable=True, server_default=""),
        sa.Column("active", sa.DateTime(timezone=True), nullable=True),
    ]
    for column in added:
        if column.name not in have:
            op.add_column("api_tokens", column)
    _sources().create(bind, checkfirst=True)

    now = dt.datetime.now(dt.UTC)
    cap = now + CAP
    name = bind.dialect.name
    tokens = sa.table("api_tokens", sa.column("pk", sa.Integer),
                      sa.column("expires", sa.DateTime(timezone=True)),
                      sa.column("active", sa.DateTime(timezone=True)))
    rows = bind.execute(sa.select(tokens.c.pk, tokens.c.expires, tokens.c.active)).all()
    for pk, expires, active in rows:
        change: dict[str, dt.datetime] = {}
        if expires is not None and _aware(expires) > cap:
            change["expires"] = _stored(cap, name)
        if active is None:
            change["active"] = _stored(now, name)
        if change:
            bind.execute(sa.update(tokens).where(tokens.c.pk == pk).values(**change))


def downgrade() -> None:
    _sources().drop(op.get_bind(), checkfirst=True)
