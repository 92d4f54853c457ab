"""SQL of the API-token aggregate: insert, list, look up and revoke ``api_tokens`` rows.

Session contract as in :mod:`gradwatch.server.store` (caller owns the transaction; blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiToken

__all__ = ["get_token", "has_active_tokens", "insert_token", "list_tokens", "revoke_token"]


def insert_token(
    session: Session,
    *,
    key: str,
    token_hash: str,
    project: str,
    scopes: str,
    name: str,
    now: datetime,
) -> None:
    """Add a token row (``scopes`` in its stored comma-separated spelling)."""
    session.add(
        ApiToken(
            key=key,
            token_hash=token_hash,
            project=project,
            scopes=scopes,
            name=name,
            created_at=now,
            revoked_at=None,
        )
    )


def list_tokens(session: Session) -> Sequence[ApiToken]:
    """Every token row (revoked ones too), oldest first."""
    return session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.key)).all()


def get_token(session: Session, key: str) -> ApiToken | None:
    """The token row with this key, or None (a primary-key lookup)."""
    return session.get(ApiToken, key)


def revoke_token(session: Session, key: str, now: datetime) -> bool:
    """Mark a token revoked at ``now`` (row locked); False if none is valid with this key."""
    row = session.get(ApiToken, key, with_for_update=True)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = now
    return True


def has_active_tokens(session: Session) -> bool:
    """Whether any token that is not revoked exists (one indexed query)."""
    statement = select(ApiToken.key).where(ApiToken.revoked_at.is_(None)).limit(1)
    return session.execute(statement).first() is not None
