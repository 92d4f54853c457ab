"""SQL of detection: events, per-run detector state and counts, project detector configs.

Session contract as in :mod:`gradwatch.server.store` (caller owns the transaction; blocks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Table,
    case,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from .models import (
    RUN_LEVEL,
    DetectorCount,
    DetectorState,
    Event,
    ProjectSettings,
)

__all__ = [
    "EventCursor",
    "EventFilter",
    "add_detector_counts",
    "get_detector_counts",
    "get_detector_state",
    "get_events_ending_at",
    "get_project_detectors",
    "list_events",
    "put_detector_state",
    "put_project_detectors",
    "summarise_event_layers",
]


_DETECTOR_STATES = cast(Table, DetectorState.__table__)

_CRITICAL = "critical"
_WARNING = "warning"
"""Stored spellings of the two severities (``Event.severity``)."""


# Detectors ----------------------------------------------------------------------------------


def get_project_detectors(session: Session, project: str) -> dict[str, Any] | None:
    """Return a project's stored detector configuration (JSON), or None when it has none."""
    statement = select(ProjectSettings.detectors).where(ProjectSettings.project == project)
    return session.execute(statement).scalar_one_or_none()


def put_project_detectors(
    session: Session, project: str, detectors: dict[str, Any], now: datetime
) -> None:
    """Store a project's detector configuration, replacing any earlier one."""
    stored = session.get(ProjectSettings, project, with_for_update=True)
    if stored is None:
        session.add(ProjectSettings(project=project, detectors=detectors, updated_at=now))
    else:
        stored.detectors = detectors
        stored.updated_at = now


def get_detector_state(session: Session, run_id: str) -> bytes | None:
    """Return a run's serialised detector state, or None before its first batch."""
    statement = select(DetectorState.state).where(DetectorState.run_id == run_id)
    return session.execute(statement).scalar_one_or_none()


def put_detector_state(session: Session, run_id: str, state: bytes, now: datetime) -> None:
    """Store a run's detector state. The caller must hold the run's lock.

    One Core ``UPDATE`` (an ``INSERT`` at the run's first batch): every batch writes it, and
    loading the row as an ORM object first cost a query and a flush more.
    """
    table = _DETECTOR_STATES
    connection = session.connection()
    values = {"state": state, "updated_at": now}
    result = connection.execute(update(table).where(table.c.run_id == run_id).values(values))
    if result.rowcount == 0:
        connection.execute(insert(table).values(run_id=run_id, **values))


def get_events_ending_at(
    session: Session, run_id: str, keys: Sequence[tuple[str, str, int]]
) -> dict[tuple[str, str, int], Event]:
    """Return the stored event of each (rule, layer, last step) in ``keys`` that has one.

    Events of one (rule, layer) never share a last step (a step's trigger belongs to one
    event), so the key names at most one event; the newest wins should old data disagree.
    """
    if not keys:
        return {}
    statement = (
        select(Event)
        .where(
            Event.run_id == run_id,
            tuple_(Event.rule, Event.layer, Event.last_step).in_(list(keys)),
        )
        .order_by(Event.id)
    )
    return {
        (event.rule, event.layer, event.last_step): event for event in session.scalars(statement)
    }


def add_detector_counts(
    session: Session, run_id: str, counts: Mapping[tuple[str, str], int]
) -> None:
    """Add detections to a run's (rule, severity) counters. The caller holds the run's lock."""
    if not counts:
        return
    stored = {
        (row.rule, row.severity): row
        for row in session.scalars(select(DetectorCount).where(DetectorCount.run_id == run_id))
    }
    for (rule, severity), count in counts.items():
        row = stored.get((rule, severity))
        if row is None:
            session.add(DetectorCount(run_id=run_id, rule=rule, severity=severity, count=count))
        else:
            row.count += count


def get_detector_counts(session: Session, run_id: str) -> dict[tuple[str, str], int]:
    """Return a run's detection counts by (rule, severity)."""
    statement = select(DetectorCount.rule, DetectorCount.severity, DetectorCount.count).where(
        DetectorCount.run_id == run_id
    )
    return {(rule, severity): count for rule, severity, count in session.execute(statement)}


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events of a run to list; None fields do not filter."""

    rules: Sequence[str] | None = None
    severities: Sequence[str] | None = None
    layer: str | None = None
    start: int | None = None
    """Only events that reach this step or later."""
    end: int | None = None
    """Only events that start at this step or earlier."""


EventCursor = tuple[int, int]
"""Keyset position (first_step, id) of the last event of a page."""


def list_events(
    session: Session, run_id: str, where: EventFilter, after: EventCursor | None, limit: int
) -> list[Event]:
    """Return up to ``limit`` events of a run, newest first (by first step, then id)."""
    statement = (
        select(Event)
        .where(Event.run_id == run_id)
        .order_by(Event.first_step.desc(), Event.id.desc())
        .limit(limit)
    )
    if where.rules:
        statement = statement.where(Event.rule.in_(where.rules))
    if where.severities:
        statement = statement.where(Event.severity.in_(where.severities))
    if where.layer is not None:
        statement = statement.where(Event.layer == where.layer)
    if where.start is not None:
        statement = statement.where(Event.last_step >= where.start)
    if where.end is not None:
        statement = statement.where(Event.first_step <= where.end)
    if after is not None:
        statement = statement.where(tuple_(Event.first_step, Event.id) < tuple_(*after))
    return list(session.scalars(statement))


def summarise_event_layers(
    session: Session, run_id: str, limit: int
) -> list[tuple[str, int, int, str]]:
    """Return the layers with the most detections: (layer, detections, events, worst severity).

    Run-level events (``layer == ''``) are left out. Ordered by detections, most first. The
    severity is the stored spelling (``"critical"`` or ``"warning"``).
    """
    critical = func.max(case((Event.severity == _CRITICAL, 1), else_=0))
    detections = func.sum(Event.count)
    statement = (
        select(Event.layer, detections, func.count(), critical)
        .where(Event.run_id == run_id, Event.layer != RUN_LEVEL)
        .group_by(Event.layer)
        .order_by(detections.desc(), Event.layer)
        .limit(limit)
    )
    return [
        (layer, int(total), int(events), _CRITICAL if worst else _WARNING)
        for layer, total, events, worst in session.execute(statement)
    ]
