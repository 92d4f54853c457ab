"""Incident bundles announced by the agent: stored once per (run, step), listed by step.

Blocking database calls; not thread-safe per session (as every store module).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Incident

__all__ = ["Announcement", "add_incidents", "list_incidents"]


class Announcement(Protocol):
    """What an announcement carries (``event_schemas.IncidentIn`` has these attributes)."""

    @property
    def step(self) -> int: ...
    @property
    def cause(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def learning_rate(self) -> float | None: ...
    @property
    def loss_scale(self) -> float | None: ...
    @property
    def recorded(self) -> Any: ...


def add_incidents(
    session: Session, run_id: str, announced: Sequence[Announcement], now: datetime
) -> None:
    """Store the announcements of steps not announced before (a resend is a no-op).

    The caller must hold the run's lock (``runs.get_run(..., for_update=True)``) so two
    writers never insert the same step.
    """
    steps = [item.step for item in announced]
    stored = set(
        session.scalars(
            select(Incident.step).where(Incident.run_id == run_id, Incident.step.in_(steps))
        )
    )
    for item in announced:
        if item.step in stored:
            continue
        stored.add(item.step)
        session.add(
            Incident(
                run_id=run_id,
                step=item.step,
                cause=item.cause,
                path=item.path,
                host=item.host,
                bytes=item.bytes,
                format=item.format,
                learning_rate=item.learning_rate,
                loss_scale=item.loss_scale,
                recorded=None if item.recorded is None else item.recorded.model_dump(),
                announced_at=now,
            )
        )


def list_incidents(
    session: Session,
    run_id: str,
    limit: int = 1000,
    start: int | None = None,
    end: int | None = None,
) -> list[Incident]:
    """A run's incidents with ``start <= step <= end``, by step, at most ``limit`` (the
    newest when there are more)."""
    statement = select(Incident).where(Incident.run_id == run_id)
    if start is not None:
        statement = statement.where(Incident.step >= start)
    if end is not None:
        statement = statement.where(Incident.step <= end)
    rows = session.scalars(statement.order_by(Incident.step.desc()).limit(limit)).all()
    return list(reversed(rows))
