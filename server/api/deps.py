"""Annotated FastAPI dependencies shared by the routers (settings, sessions, metrics, auth).

Authentication dependencies: :data:`IngestAccess` and :data:`ReadAccess` check the bearer token
for a scope; :data:`IngestRunAccess` and :data:`ReadRunAccess` also check that the run of the
``run_id`` path parameter belongs to the token's project (403 otherwise; an unknown run is left
to the handler's 404).

No ``from __future__ import annotations`` here: FastAPI must see the real ``Annotated`` objects
of the dependency factories' inner functions, which close over their ``scope``.
"""

from collections.abc import Callable, Iterator
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
    "DatabaseDep",
    "IngestAccess",
    "IngestRunAccess",
    "MetricsDep",
    "ReadAccess",
    "ReadRunAccess",
    "ReadSessionDep",
    "SettingsDep",
    "WriteSessionDep",
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


def _authenticate(scope: TokenScope) -> Callable[..., Principal]:
    def authenticate(
        credentials: _Credentials,
        database: DatabaseDep,
        authenticator: Annotated[Authenticator, Depends(get_authenticator)],
    ) -> Principal:
        bearer = None if credentials is None else credentials.credentials
        with database.read_session() as session:
            return authenticator.authenticate(session, bearer, scope)

    return authenticate


def _authorize_run(scope: TokenScope) -> Callable[..., Principal]:
    def authorize(
        run_id: UUID,
        principal: Annotated[Principal, Depends(_authenticate(scope))],
        database: DatabaseDep,
    ) -> Principal:
        if principal.project is not None:
            with database.read_session() as session:
                project = run_store.get_run_project(session, str(run_id))
            if project is not None:
                principal.check_project(project)
        return principal

    return authorize


IngestAccess = Annotated[Principal, Depends(_authenticate(TokenScope.INGEST))]
"""The caller, checked for the ``ingest`` scope."""
ReadAccess = Annotated[Principal, Depends(_authenticate(TokenScope.READ))]
"""The caller, checked for the ``read`` scope."""
IngestRunAccess = Annotated[Principal, Depends(_authorize_run(TokenScope.INGEST))]
"""The caller, checked for ``ingest`` on the project of the path's run."""
ReadRunAccess = Annotated[Principal, Depends(_authorize_run(TokenScope.READ))]
"""The caller, checked for ``read`` on the project of the path's run."""
