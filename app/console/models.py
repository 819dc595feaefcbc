"""The console's tables: sign-in links and sessions, both found by the SHA-256 of a random token
(the token itself is only ever in the admin's hands)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.orm import Base


class ConsoleLink(Base):
    """A single-use sign-in link (development: ``connectors console-link``)."""

    __tablename__ = "console_links"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    read_only: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()


class ConsoleSession(Base):
    """A signed-in admin: kept server-side, so sign-out and expiry hold on every replica."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_expires_at", "expires_at"),)

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    read_only: Mapped[bool] = mapped_column(Boolean)
    # Sent with every form that changes something, and compared with this.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column()
    last_seen_at: Mapped[datetime] = mapped_column()
    # The absolute end, whatever the activity.
    expires_at: Mapped[datetime] = mapped_column()
