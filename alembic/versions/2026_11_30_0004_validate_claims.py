"""Validate claims: which version of a connector was last checked on demand, and when.

``POST /connectors/{id}/validate`` claims its live check with one conditional UPDATE that sets
these only when the version differs or the last claim is older than the interval, so replicas
over one database make at most one provider request per connector version and interval.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.add_column(sa.Column("validate_claimed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("validate_claimed_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("connectors") as batch:
        batch.drop_column("validate_claimed_version")
        batch.drop_column("validate_claimed_at")
