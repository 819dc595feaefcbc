"""Console sign-in links and sessions.

A sign-in link carries 256 random bits, is stored as their SHA-256, is used once and lasts 5
minutes. Redeeming it opens a session: another 256 random bits, in an ``HttpOnly``,
``SameSite=Lax`` cookie (``Secure`` unless the service is reached over plain http on loopback),
stored as their SHA-256 with the organization, the admin's ``sub``, whether they may change
anything, and the session's CSRF token. A session ends after 30 minutes without a request, after
8 hours whatever happens, or at sign-out; being in the database, each of these holds on every
replica at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from datetime import timedelta
from typing import Final

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.console.models import ConsoleLink, ConsoleSession
from app.core.clock import Clock
from app.core.db import Database

__all__ = ["LINK_TTL", "Session", "SessionStore"]

LINK_TTL: Final = timedelta(minutes=5)
IDLE_TIMEOUT: Final = timedelta(minutes=30)
ABSOLUTE_TIMEOUT: Final = timedelta(hours=8)
# A session's last activity is written at most this often (reads would otherwise all write).
TOUCH_EVERY: Final = timedelta(minutes=1)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """A signed-in admin, as pages see them."""

    organization_id: str
    subject: str
    read_only: bool
    csrf_token: str

    @property
    def can_write(self) -> bool:
        return not self.read_only


class SessionStore:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        idle: timedelta = IDLE_TIMEOUT,
        absolute: timedelta = ABSOLUTE_TIMEOUT,
    ) -> None:
        self._db = db
        self._clock = clock
        self._idle = idle
        self._absolute = absolute

    async def create_link(self, organization_id: str, subject: str, *, read_only: bool) -> str:
        """A new sign-in link's token (single use, valid ``LINK_TTL``)."""
        token = secrets.token_urlsafe(32)
        now = self._clock.now()
        async with self._db.write() as session:
            await session.execute(delete(ConsoleLink).where(ConsoleLink.expires_at <= now))
            session.add(
                ConsoleLink(
                    token_hash=_digest(token),
                    organization_id=organization_id,
                    subject=subject,
                    read_only=read_only,
                    created_at=now,
                    expires_at=now + LINK_TTL,
                )
            )
        return token

    async def redeem_link(self, token: str) -> tuple[str, Session] | None:
        """Open a session with a sign-in link (used up whatever the outcome): the session's id
        (for the cookie) and the session; None for an unknown, used or expired link."""
        now = self._clock.now()
        async with self._db.write() as session:
            link = (
                await session.execute(select(ConsoleLink).where(ConsoleLink.token_hash == _digest(token)))
            ).scalar_one_or_none()
            if link is None:
                return None
            taken = await session.execute(
                delete(ConsoleLink)
                .where(ConsoleLink.token_hash == link.token_hash)
                .execution_options(synchronize_session=False)
            )
            if not getattr(taken, "rowcount", 0) or link.expires_at <= now:
                return None
            return await self._open(session, link.organization_id, link.subject, link.read_only)

    async def open(self, organization_id: str, subject: str, *, read_only: bool) -> tuple[str, Session]:
        """Open a session for an admin signed in another way (OpenID Connect)."""
        async with self._db.write() as session:
            return await self._open(session, organization_id, subject, read_only)

    async def _open(
        self, db_session: AsyncSession, organization_id: str, subject: str, read_only: bool
    ) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self._clock.now()
        db_session.add(
            ConsoleSession(
                id_hash=_digest(session_id),
                organization_id=organization_id,
                subject=subject,
                read_only=read_only,
                csrf_token=csrf,
                created_at=now,
                last_seen_at=now,
                expires_at=now + self._absolute,
            )
        )
        return session_id, Session(organization_id, subject, read_only, csrf)

    async def get(self, session_id: str) -> Session | None:
        """The session of a cookie, if it is still open (its activity noted)."""
        now = self._clock.now()
        async with self._db.write() as session:
            row = (
                await session.execute(
                    select(ConsoleSession).where(ConsoleSession.id_hash == _digest(session_id))
                )
            ).scalar_one_or_none()
            if row is None:
                return None
            if now >= row.expires_at or now - row.last_seen_at >= self._idle:
                await session.delete(row)
                return None
            if now - row.last_seen_at >= TOUCH_EVERY:
                await session.execute(
                    update(ConsoleSession)
                    .where(ConsoleSession.id_hash == row.id_hash)
                    .values(last_seen_at=now)
                    .execution_options(synchronize_session=False)
                )
            return Session(row.organization_id, row.subject, row.read_only, row.csrf_token)

    async def end(self, session_id: str) -> None:
        async with self._db.write() as session:
            await session.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == _digest(session_id)))
            # Sessions past their end go with it.
            await session.execute(
                delete(ConsoleSession).where(ConsoleSession.expires_at <= self._clock.now())
            )
