"""Authorization code connectors: the grant an admin gave, and consents under way.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "connector_grants",
        sa.Column("connector_id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.String(255), nullable=False),
        sa.Column("refresh_token", sa.Text(), nullable=True),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("access_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("granted_scope", sa.Text(), nullable=True),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["connector_id"], ["connectors.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("connector_id"),
    )
    op.create_table(
        "consent_requests",
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(255), nullable=False),
        sa.Column("connector_id", sa.Uuid(), nullable=False),
        sa.Column("connector_version", sa.Integer(), nullable=False),
        sa.Column("code_verifier", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("return_url", sa.String(2048), nullable=True),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("binding_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["connector_id"], ["connectors.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("state_hash"),
    )
    op.create_index("ix_consent_requests_expires_at", "consent_requests", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_consent_requests_expires_at", table_name="consent_requests")
    op.drop_table("consent_requests")
    op.drop_table("connector_grants")
