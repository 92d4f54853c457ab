"""API tokens, scopes, open mode, the per-token rate limit and the failed-authentication limit.

A token belongs to one project and carries scopes: ``ingest`` (create runs, send batches, set
a run's status) and ``read`` (list and query runs). It reads ``gw_<key>_<secret>``; the
database keeps the public ``key`` and the SHA-256 of the whole token, never the token, and
compares hashes with :func:`hmac.compare_digest` (constant time). Clients send it as
``Authorization: Bearer <token>``.

Open mode: while no token exists and ``Settings.require_auth`` is off, requests need no token
and may touch every project. The first token turns authentication on for good (until restart,
so revoking every token fails closed). ``gradwatch server`` only allows open mode on a
loopback address unless ``--insecure`` (see :func:`require_auth_for_bind`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from .errors import AuthenticationError, PermissionDeniedError
from .ratelimit import RateLimiter
from .store import tokens as token_store

__all__ = [
    "OPEN_ACCESS",
    "Authenticator",
    "InsecureBindError",
    "NewToken",
    "Principal",
    "RateLimiter",
    "TokenInfo",
    "TokenScope",
    "create_token",
    "has_active_tokens",
    "hash_token",
    "is_loopback",
    "list_tokens",
    "require_auth_for_bind",
    "revoke_token",
]

_PREFIX = "gw"
_KEY_BYTES = 6
_SECRET_BYTES = 32


class TokenScope(enum.StrEnum):
    """What a token may do."""

    INGEST = "ingest"
    """Create runs, send batches, set a run's status."""
    READ = "read"
    """List runs, read runs, layers and series."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's project and scopes, or open access.

    Attributes:
        key: The token's public key; None in open mode.
        project: The only project the caller may touch; None means every project.
        scopes: What the caller may do.
    """

    key: str | None
    project: str | None
    scopes: frozenset[TokenScope]

    def check_project(self, project: str) -> None:
        """Raise unless the caller may touch ``project``.

        Raises:
            PermissionDeniedError: The token belongs to another project.
        """
        if self.project is not None and project != self.project:
            raise PermissionDeniedError(
                f"project: this token is for project {self.project!r}, not {project!r}"
            )


OPEN_ACCESS = Principal(key=None, project=None, scopes=frozenset(TokenScope))
"""The caller in open mode: every scope, every project."""


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token just created; ``token`` is shown once and never stored."""

    key: str
    token: str
    project: str
    scopes: frozenset[TokenScope]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A stored token, without its secret."""

    key: str
    project: str
    scopes: frozenset[TokenScope]
    name: str
    created_at: datetime
    revoked_at: datetime | None


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token (tokens carry 256 random bits, so no salt or stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _format_scopes(scopes: Iterable[TokenScope]) -> str:
    return ",".join(sorted(TokenScope(scope).value for scope in scopes))


def _parse_scopes(text: str) -> frozenset[TokenScope]:
    return frozenset(TokenScope(part) for part in text.split(",") if part)


def create_token(
    session: Session, project: str, scopes: Iterable[TokenScope], name: str, now: datetime
) -> NewToken:
    """Create a token in one transaction (committed here); return it with its secret.

    Blocks on the database. The session must not be in a transaction yet.

    Args:
        session: A write session.
        project: The project the token may touch.
        scopes: At least one scope.
        name: A free description (who or what uses the token).
        now: Creation time (timezone-aware).

    Raises:
        ValueError: No scope given.
    """
    scope_set = frozenset(TokenScope(scope) for scope in scopes)
    if not scope_set:
        raise ValueError("scopes: give at least one of 'ingest', 'read'")
    key = secrets.token_hex(_KEY_BYTES)
    token = f"{_PREFIX}_{key}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    with session.begin():
        token_store.insert_token(
            session,
            key=key,
            token_hash=hash_token(token),
            project=project,
            scopes=_format_scopes(scope_set),
            name=name,
            now=now,
        )
    return NewToken(key=key, token=token, project=project, scopes=scope_set)


def list_tokens(session: Session) -> list[TokenInfo]:
    """Return every token (revoked ones too), oldest first. Blocks on the database."""
    rows = token_store.list_tokens(session)
    return [
        TokenInfo(
            key=row.key,
            project=row.project,
            scopes=_parse_scopes(row.scopes),
            name=row.name,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )
        for row in rows
    ]


def revoke_token(session: Session, key: str, now: datetime) -> bool:
    """Revoke a token by key (committed here); return False if no valid token has it."""
    with session.begin():
        return token_store.revoke_token(session, key, now)


def has_active_tokens(session: Session) -> bool:
    """Whether any token that is not revoked exists (one indexed query)."""
    return token_store.has_active_tokens(session)


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`, one per app.

    Thread-safe: the only state is a flag that flips once (tokens exist) and the rate
    limiters' lock-protected buckets.

    Args:
        require_auth: Refuse requests without a valid token even while no token exists.
        limiter: The per-token rate limit.
        failure_limiter: The limit on failed authentications (a token sent that is unknown,
            malformed or revoked) per client address; None for no limit. An address over it
            gets 429 without its token being checked.
    """

    def __init__(
        self,
        *,
        require_auth: bool,
        limiter: RateLimiter,
        failure_limiter: RateLimiter | None = None,
    ) -> None:
        self._require_auth = require_auth
        self._limiter = limiter
        self._failures = failure_limiter
        self._tokens_seen = False

    def authenticate(
        self, session: Session, bearer: str | None, scope: TokenScope, client: str | None = None
    ) -> Principal:
        """Check a bearer token (or its absence) against ``scope`` and the rate limits.

        Blocks for one or two indexed queries.

        Args:
            session: A read session.
            bearer: The token from ``Authorization: Bearer``; None when not sent.
            scope: What the request needs.
            client: The client's address, the key of the failed-authentication limit.

        Raises:
            AuthenticationError: No token while one is required; an unknown, malformed or
                revoked token.
            PermissionDeniedError: The token lacks ``scope``.
            RateLimitedError: The token is over its rate limit, or ``client`` over its limit
                of failed authentications.
        """
        if bearer is None:
            if self._require_auth or self._tokens_exist(session):
                raise AuthenticationError(
                    "Authorization: this server requires a token "
                    "(send 'Authorization: Bearer <token>'; create one with "
                    "'gradwatch token create --project P --scope ingest')"
                )
            return OPEN_ACCESS
        address = client or "unknown"
        if self._failures is not None:
            self._failures.check(address)
        try:
            principal = self._verify(session, bearer)
        except AuthenticationError:
            if self._failures is not None:
                self._failures.acquire(address)
            raise
        if scope not in principal.scopes:
            raise PermissionDeniedError(
                f"scope: this token has scopes {_format_scopes(principal.scopes)!r}; "
                f"this request needs {scope.value!r}"
            )
        assert principal.key is not None
        self._limiter.acquire(principal.key)
        return principal

    def _tokens_exist(self, session: Session) -> bool:
        if not self._tokens_seen and has_active_tokens(session):
            self._tokens_seen = True
        return self._tokens_seen

    def _verify(self, session: Session, token: str) -> Principal:
        parts = token.split("_")
        invalid = AuthenticationError("Authorization: unknown, malformed or revoked token")
        if len(parts) < 3 or parts[0] != _PREFIX or len(parts[1]) != 2 * _KEY_BYTES:
            raise invalid
        row = token_store.get_token(session, parts[1])
        expected = "0" * 64 if row is None else row.token_hash
        matches = hmac.compare_digest(expected, hash_token(token))
        if row is None or not matches or row.revoked_at is not None:
            raise invalid
        self._tokens_seen = True
        return Principal(key=row.key, project=row.project, scopes=_parse_scopes(row.scopes))


class InsecureBindError(Exception):
    """``gradwatch server`` would serve without tokens on a non-loopback address."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``).

    Any other name counts as not loopback (names are not resolved). Pure; no I/O.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_auth_for_bind(host: str, *, has_tokens: bool, insecure: bool) -> bool:
    """Decide ``Settings.require_auth`` for a server bound to ``host``.

    Loopback: open mode until the first token (False). Elsewhere with tokens: True (fail
    closed even if every token is later revoked). Elsewhere without tokens: refused unless
    ``insecure``, then open (False).

    Raises:
        InsecureBindError: Non-loopback address, no token, no ``insecure``.
    """
    if is_loopback(host):
        return False
    if has_tokens:
        return True
    if insecure:
        return False
    raise InsecureBindError(
        f"refusing to serve on {host} without API tokens: anyone who can reach it could "
        "write and read every run. Create a token first (gradwatch token create --project P "
        "--scope ingest), bind to 127.0.0.1, or pass --insecure to serve open anyway."
    )
