"""Connectors by their last change, newest first: what a starting process loads into memory.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_connectors_change_seq", "connectors", ["change_seq", "id"])


def downgrade() -> None:
    op.drop_index("ix_connectors_change_seq", table_name="connectors")
