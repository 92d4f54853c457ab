"""A run's incident bundles as replies: listed, and attached to the events they fall in.

Functions take a :class:`~sqlalchemy.orm.Session`, block on the database and never write.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any, Literal, cast

from sqlalchemy.orm import Session

from ..errors import RunNotFoundError
from ..event_schemas import IncidentList, IncidentOut, IncidentRows
from ..history import history_line
from ..store import incidents as incident_store
from ..store import runs as run_store
from ..store.models import RUN_LEVEL, Event, Incident

__all__ = ["incident_out", "incidents_by_event", "list_incidents"]


def list_incidents(session: Session, run_id: str) -> IncidentList:
    """Every incident bundle announced for a run, by step.

    Raises:
        RunNotFoundError: No run has this id.
    """
    if run_store.get_run(session, run_id) is None:
        raise RunNotFoundError(run_id)
    rows = incident_store.list_incidents(session, run_id)
    return IncidentList(run_id=run_id, incidents=[incident_out(row) for row in rows])


def incident_out(row: Incident) -> IncidentOut:
    """One stored incident as a reply, with the command that replays it on its host."""
    return IncidentOut(
        step=row.step,
        cause=cast(Literal["nonfinite", "skipped", "explosion"], row.cause),
        path=row.path,
        host=row.host,
        bytes=row.bytes,
        format=row.format,
        learning_rate=row.learning_rate,
        loss_scale=row.loss_scale,
        announced_at=row.announced_at,
        replay=f"gradwatch replay {shlex.quote(row.path)}",
        recorded=None if row.recorded is None else IncidentRows.model_validate(row.recorded),
        learning_rate_history=_history("learning rate", row.recorded, "learning_rate"),
        loss_scale_history=_history("loss scale", row.recorded, "loss_scale"),
    )


def _history(label: str, recorded: dict[str, Any] | None, column: str) -> str | None:
    if not recorded:
        return None
    pairs = zip(recorded["step"], recorded[column], strict=True)
    return history_line(label, [(int(step), float(v)) for step, v in pairs if v is not None])


def incidents_by_event(
    session: Session, run_id: str, events: Sequence[Event]
) -> dict[int, list[IncidentOut]]:
    """The incidents of each run-level event (by event id): those whose step lies in the
    event's steps. One query for the whole page."""
    run_level = [event for event in events if event.layer == RUN_LEVEL]
    if not run_level:
        return {}
    start = min(event.first_step for event in run_level)
    end = max(event.last_step for event in run_level)
    rows = incident_store.list_incidents(session, run_id, start=start, end=end)
    if not rows:
        return {}
    return {
        event.id: [
            incident_out(row) for row in rows if event.first_step <= row.step <= event.last_step
        ]
        for event in run_level
    }
