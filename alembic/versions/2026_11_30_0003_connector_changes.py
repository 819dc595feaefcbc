"""Connector changes: a gapless sequence of every committed change, for the replicas' followers.

``change_sequence`` has one row; every write transaction that changes a connector (its
configuration, its status, or its existence) takes the next number from it and records it in
``connector_changes``. The counter's row lock is held until the transaction ends, so numbers are
taken in commit order and a rolled-back transaction gives its number back: a follower reading
``seq > cursor`` can neither step over a late commit nor wait for a gap that never fills.
Each connector row also keeps the number of its last change (``change_seq``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    sequence = op.create_table(
        "change_sequence",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(sequence, [{"id": 1, "last_seq": 0}])
    op.create_table(
        "connector_changes",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("organization_id", sa.String(255), nullable=False),
        sa.Column("connector_id", sa.Uuid(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_connector_changes_changed_at", "connector_changes", ["changed_at"])
    # The number of the last change written to the row: a copy of it in memory is replaced only
    # by a newer one.
    with op.batch_alter_table("connectors") as batch:
        batch.add_column(sa.Column("change_seq", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.drop_column("change_seq")
    op.drop_index("ix_connector_changes_changed_at", table_name="connector_changes")
    op.drop_table("connector_changes")
    op.drop_table("change_sequence")
