"""Annotated FastAPI dependencies shared by the routers (settings, sessions, metrics, auth).

Authentication dependencies: :data:`IngestAccess` and :data:`ReadAccess` check the bearer token
for a scope; :data:`IngestRunAccess` and :data:`ReadRunAccess` also check that the run of the
``run_id`` path parameter belongs to the token's project (403 otherwise; an unknown run is left
to the handler's 404).

No ``from __future__ import annotations`` here: FastAPI must see the real ``Annotated`` objects
of the dependency factories' inner functions, which close over their ``scope``.
"""

from collections.abc import Iterator
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ..auth import Authenticator, Principal, TokenScope
from ..config import Settings
from ..export.prometheus import ServerMetrics
from ..store import runs as run_store
from ..store.db import Database

__all__ = [
    "Access",
    "DatabaseDep",
    "IngestAccess",
    "IngestRunAccess",
    "MetricsDep",
    "ReadAccess",
    "ReadRunAccess",
    "ReadSessionDep",
    "SettingsDep",
    "WriteSessionDep",
    "check_access",
    "get_authenticator",
    "get_database",
    "get_metrics",
    "get_read_session",
    "get_settings",
    "get_write_session",
]


def get_settings(request: Request) -> Settings:
    """Return the app's settings."""
    settings = request.app.state.settings
    if not isinstance(settings, Settings):
        raise RuntimeError("app was not built by gradwatch.server.app.create_app")
    return settings


def get_metrics(request: Request) -> ServerMetrics:
    """Return the app's metrics registry and self-metrics."""
    metrics = request.app.state.metrics
    if not isinstance(metrics, ServerMetrics):
        raise RuntimeError("app was not built by gradwatch.server.app.create_app")
    return metrics


def get_database(request: Request) -> Database:
    """Return the app's database (available once the lifespan has started)."""
    database = getattr(request.app.state, "database", None)
    if not isinstance(database, Database):
        raise RuntimeError("database not open: the app's lifespan has not started")
    return database


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
DatabaseDep = Annotated[Database, Depends(get_database)]


def get_read_session(database: DatabaseDep) -> Iterator[Session]:
    """Yield a read session for one request; closed (rolled back) afterwards."""
    with database.read_session() as session:
        yield session


def get_write_session(database: DatabaseDep) -> Iterator[Session]:
    """Yield a write session for one request; the handler's service call commits."""
    with database.write_session() as session:
        yield session


ReadSessionDep = Annotated[Session, Depends(get_read_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]


def get_authenticator(request: Request) -> Authenticator:
    """Return the app's token authenticator."""
    authenticator = request.app.state.authenticator
    if not isinstance(authenticator, Authenticator):
        raise RuntimeError("app was not built by gradwatch.server.app.create_app")
    return authenticator


_bearer = HTTPBearer(
    auto_error=False,
    description="A gradwatch API token (gradwatch token create). Not needed in open mode.",
)
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_STATE_KEY = "gradwatch_access"


class Access:
    """A dependency that checks the caller: token, scope and, with ``per_run``, the project of
    the run in the path (403 for another project's run; an unknown run is left to the
    handler's 404).

    Body routes (:class:`~gradwatch.server.api.route.DecodedBodyRoute`) run the same check
    before reading the body; the answer is kept on the request, so the dependency then returns
    it without a second check (or a second rate-limit charge). Instances are immutable and
    thread-safe.

    Args:
        scope: What the route needs.
        per_run: Also check the project of the path's ``run_id``.
    """

    def __init__(self, scope: TokenScope, *, per_run: bool) -> None:
        self.scope = scope
        self.per_run = per_run

    def __call__(self, request: Request, credentials: _Credentials) -> Principal:
        """Return the checked caller (blocks for up to three indexed queries)."""
        del credentials  # declared for OpenAPI's security scheme; read again by check_access
        return check_access(request, self)


def check_access(request: Request, access: Access) -> Principal:
    """Check the request's caller against ``access`` once per request; blocks on the database.

    Raises:
        AuthenticationError: No valid token where one is needed.
        PermissionDeniedError: The token lacks the scope, or is for another project than the
            path's run.
        RateLimitedError: The token, or the client address's failed authentications, are over
            their rate limit.
    """
    checked = getattr(request.state, _STATE_KEY, None)
    if checked is not None and checked[0] is access:
        return checked[1]  # type: ignore[no-any-return]
    bearer = _bearer_token(request)
    client = None if request.client is None else request.client.host
    with get_database(request).read_session() as session:
        principal = get_authenticator(request).authenticate(
            session, bearer, access.scope, client=client
        )
        run_id = _path_run_id(request) if access.per_run else None
        if principal.project is not None and run_id is not None:
            project = run_store.get_run_project(session, run_id)
            if project is not None:
                principal.check_project(project)
    setattr(request.state, _STATE_KEY, (access, principal))
    return principal


def _bearer_token(request: Request) -> str | None:
    """The ``Authorization: Bearer`` credentials, as ``HTTPBearer`` reads them."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def _path_run_id(request: Request) -> str | None:
    """The path's ``run_id`` as a canonical uuid; None when absent or not a uuid (FastAPI
    refuses the path then)."""
    raw = request.path_params.get("run_id")
    try:
        return None if raw is None else str(UUID(str(raw)))
    except ValueError:
        return None


IngestAccess = Annotated[Principal, Depends(Access(TokenScope.INGEST, per_run=False))]
"""The caller, checked for the ``ingest`` scope."""
ReadAccess = Annotated[Principal, Depends(Access(TokenScope.READ, per_run=False))]
"""The caller, checked for the ``read`` scope."""
IngestRunAccess = Annotated[Principal, Depends(Access(TokenScope.INGEST, per_run=True))]
"""The caller, checked for ``ingest`` on the project of the path's run."""
ReadRunAccess = Annotated[Principal, Depends(Access(TokenScope.READ, per_run=True))]
"""The caller, checked for ``read`` on the project of the path's run."""
