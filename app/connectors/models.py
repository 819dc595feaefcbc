"""Tables. The schema itself is created and changed only by Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.core.orm import Base


class Organization(Base):
    """One row per organization that ever had a connector; its lock serialises creates."""

    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column()


class Connector(Base):
    __tablename__ = "connectors"
    __table_args__ = (
        UniqueConstraint("organization_id", "name_key", name="uq_connectors_org_name"),
        Index("ix_connectors_org_name", "organization_id", "name"),
        Index("ix_connectors_key_id", "key_id"),
        # What a starting process loads, in its order (ConnectorRepository.recent): the called
        # lately by when, then the others (used_at null) by their last change.
        Index("ix_connectors_preload", "used_at", "change_seq", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    organization_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("organizations.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(100))
    # casefold()ed name: uniqueness per organization is case-insensitive.
    name_key: Mapped[str] = mapped_column(String(400))
    resource_domain_url: Mapped[str] = mapped_column(String(2048))
    auth_type: Mapped[str] = mapped_column(String(32))
    grant_type: Mapped[str | None] = mapped_column(String(32))
    # Non-secret auth fields (username, client_id, URLs, scope, ...).
    auth_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Secret field name -> ciphertext bound to (organization, connector, field).
    secrets: Mapped[dict[str, str]] = mapped_column(JSON)
    key_id: Mapped[str] = mapped_column(String(32))
    status_state: Mapped[str] = mapped_column(String(16))
    status_checked_at: Mapped[datetime | None] = mapped_column()
    status_detail: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    # The number of the last change written to this row (app.connectors.follower).
    change_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The last live check claimed by POST /validate, and the version it checked: one check per
    # version and interval across replicas (ConnectorRepository.claim_check).
    validate_claimed_at: Mapped[datetime | None] = mapped_column()
    validate_claimed_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    # When a call of it was last noted, to within an hour (app.connectors.usage); not a change.
    used_at: Mapped[datetime | None] = mapped_column()


class ChangeSequence(Base):
    """One row: the number of the last change. Its row lock orders changes by commit."""

    __tablename__ = "change_sequence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger)


class ConnectorChange(Base):
    """A committed change of a connector (configuration, status or existence), by number.

    Rows name the connector only; followers read the connector itself. Old rows are pruned.
    """

    __tablename__ = "connector_changes"
    __table_args__ = (Index("ix_connector_changes_changed_at", "changed_at"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    organization_id: Mapped[str] = mapped_column(String(255))
    connector_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    changed_at: Mapped[datetime] = mapped_column()


class ConnectorGrant(Base):
    """The grant an admin gave an authorization code connector by consent; at most one.

    Not part of the connector's configuration: renewing a token rotates the refresh token here
    without changing the connector. ``generation`` counts the rotations: a write names the one it
    read, so a rotation written by another replica is never overwritten. ``lease_*`` is the
    renewal under way (the one replica sending the refresh token), so no two replicas ever send
    the same one.
    """

    __tablename__ = "connector_grants"

    connector_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("connectors.id", ondelete="CASCADE"), primary_key=True
    )
    organization_id: Mapped[str] = mapped_column(String(255))
    # Ciphertexts bound to (organization, connector, field), as the connector's secrets are.
    refresh_token: Mapped[str | None] = mapped_column(Text)
    # Kept only when the provider issued no refresh token: the grant ends with it.
    access_token: Mapped[str | None] = mapped_column(Text)
    access_expires_at: Mapped[datetime | None] = mapped_column()
    key_id: Mapped[str] = mapped_column(String(32))
    granted_scope: Mapped[str | None] = mapped_column(Text)
    connected_at: Mapped[datetime] = mapped_column()
    generation: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column()


class ConsentRequest(Base):
    """A consent started and not yet finished: found by its state's SHA-256, used once.

    Bound to the organization, the connector and the version it was started for; the PKCE
    verifier is a ciphertext bound to the connector (field ``code_verifier``).
    """

    __tablename__ = "consent_requests"
    __table_args__ = (Index("ix_consent_requests_expires_at", "expires_at"),)

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(255))
    connector_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("connectors.id", ondelete="CASCADE"))
    connector_version: Mapped[int] = mapped_column(Integer)
    code_verifier: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(32))
    return_url: Mapped[str | None] = mapped_column(String(2048))
    # Who started it: the audit event of its outcome names them.
    actor: Mapped[str | None] = mapped_column(String(255))
    # The SHA-256 of a value the starting browser holds in a cookie (a consent started from the
    # console): the callback must come with it, so nobody else's browser can finish it.
    binding_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
