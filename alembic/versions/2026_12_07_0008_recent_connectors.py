"""What a starting process loads into memory first: connectors called lately, then the rest by
their last change.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.add_column(sa.Column("used_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_connectors_preload", "connectors", ["used_at", "change_seq", "id"])


def downgrade() -> None:
    op.drop_index("ix_connectors_preload", table_name="connectors")
    with op.batch_alter_table("connectors") as batch:
        batch.drop_column("used_at")
