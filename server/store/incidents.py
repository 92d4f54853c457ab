"""Incident bundles announced by the agent: stored once per (run, step) with the recorder's
rows around it (merged as they arrive), listed by step.

Blocking database calls; not thread-safe per session (as every store module).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..event_schemas import MAX_RECORDED_ROWS
from .models import Incident

__all__ = ["Announcement", "add_incidents", "list_incidents", "merge_recorded"]


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
    """Store the announcements of steps not announced before; a step announced again adds
    the recorder's rows it holds for steps not stored yet (the agent sends the rows after
    the bad step as they are read). A resend changes nothing.

    The caller must hold the run's lock (``runs.get_run(..., for_update=True)``) so two
    writers never insert the same step.
    """
    steps = {item.step for item in announced}
    stored = {
        row.step: row
        for row in session.scalars(
            select(Incident).where(Incident.run_id == run_id, Incident.step.in_(steps))
        )
    }
    for item in announced:
        recorded = None if item.recorded is None else item.recorded.model_dump()
        row = stored.get(item.step)
        if row is not None:
            merged = merge_recorded(row.recorded, recorded)
            if merged is not row.recorded:
                row.recorded = merged
            continue
        stored[item.step] = row = Incident(
            run_id=run_id,
            step=item.step,
            cause=item.cause,
            path=item.path,
            host=item.host,
            bytes=item.bytes,
            format=item.format,
            learning_rate=item.learning_rate,
            loss_scale=item.loss_scale,
            recorded=recorded,
            announced_at=now,
        )
        session.add(row)


def merge_recorded(
    stored: dict[str, list[Any]] | None, new: dict[str, list[Any]] | None
) -> dict[str, list[Any]] | None:
    """Recorded columns (``IncidentRows`` as a dict) with ``new``'s rows of steps not in
    ``stored`` added, by step, up to ``MAX_RECORDED_ROWS`` rows; ``stored`` itself (the same
    object) when nothing is added."""
    if not new or not new["step"]:
        return stored
    if not stored:
        return new
    known = set(stored["step"])
    room = MAX_RECORDED_ROWS - len(stored["step"])
    fresh = [i for i, step in enumerate(new["step"]) if step not in known][: max(0, room)]
    if not fresh:
        return stored
    rows = [
        *(tuple(stored[c][i] for c in _COLUMNS) for i in range(len(stored["step"]))),
        *(tuple(new[c][i] for c in _COLUMNS) for i in fresh),
    ]
    rows.sort(key=lambda row: row[0])
    return {c: [row[k] for row in rows] for k, c in enumerate(_COLUMNS)}


_COLUMNS = ("step", "learning_rate", "loss_scale", "epoch", "step_in_epoch")
"""``IncidentRows``' columns, ``step`` first."""


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
