"""Annotated FastAPI dependencies shared by the routers (settings, sessions, metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from gradwatch.server.config import Settings
from gradwatch.server.db import Database
from gradwatch.server.metrics import ServerMetrics

__all__ = [
    "DatabaseDep",
    "MetricsDep",
    "ReadSessionDep",
    "SettingsDep",
    "WriteSessionDep",
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
