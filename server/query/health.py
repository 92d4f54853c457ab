"""A run's detector events (paged) and its one-look health summary, read from the store.

Functions take a :class:`~sqlalchemy.orm.Session`, block on the database and never write.
A session belongs to one thread.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.orm import Session

from ..detect.event import Rule, Severity
from ..errors import RunNotFoundError
from ..event_schemas import EventList, EventOut, IncidentOut, LayerHealthOut, RunHealthOut
from ..store import events as event_store
from ..store import incidents as incident_store
from ..store import runs as run_store
from ..store import series as series_store
from ..store.events import EventFilter
from ..store.models import RUN_LEVEL, Event, Run, RunStatus
from ..store.series import LayerStats
from .cursor import decode_cursor, encode_cursor
from .incidents import incident_out, incidents_by_event
from .onset import event_summary, onset_out
from .summary import last_value, max_value

__all__ = ["get_run_health", "list_events"]

_ENDPOINT = "GET /api/v1/runs/{run_id}/events"
_ANALYSED = EventFilter(
    rules=[Rule.EXPLOSION.value, Rule.NONFINITE.value, Rule.LOSS.value], layer=RUN_LEVEL
)
"""The events that carry an onset analysis: run-level explosion, nonfinite and loss."""
_HEALTH_INCIDENTS = 20
"""Incident bundles a health reply lists at most (the newest)."""


def list_events(
    session: Session,
    run_id: str,
    where: EventFilter,
    cursor: str | None,
    limit: int,
) -> EventList:
    """Return one page of a run's events, newest first (keyset on (first_step, id)).

    Raises:
        RunNotFoundError: No run has this id.
        InvalidQueryError: ``cursor`` was not produced by this function.
    """
    if run_store.get_run(session, run_id) is None:
        raise RunNotFoundError(run_id)
    after = None if cursor is None else _decode_cursor(cursor)
    rows = event_store.list_events(session, run_id, where, after, limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor([page[-1].first_step, page[-1].id]) if len(rows) > limit else None
    incidents = incidents_by_event(session, run_id, page)
    return EventList(
        run_id=run_id,
        events=[_event_out(e, incidents.get(e.id, [])) for e in page],
        next_cursor=next_cursor,
    )


def get_run_health(session: Session, run_id: str, recent_steps: int, worst: int) -> RunHealthOut:
    """Return a one-look summary of a run's gradient health.

    ``verdict`` is the highest severity among events that reach the last ``recent_steps``
    steps of the run, ``no_data`` for a run without steps, or ``healthy``. ``onset`` is the
    onset summary of the newest run-level explosion, nonfinite or loss event.

    Raises:
        RunNotFoundError: No run has this id.
    """
    run = run_store.get_run(session, run_id)
    if run is None:
        raise RunNotFoundError(run_id)
    counts = event_store.get_detector_counts(session, run_id)
    latest = event_store.list_events(session, run_id, EventFilter(), None, 1)
    analysed = event_store.list_events(session, run_id, _ANALYSED, None, 1)
    layers = {stats.name: stats for stats in series_store.list_layer_stats(session, run_id)}
    worst_layers = [
        _layer_health(layer, detections, events, severity, layers.get(layer))
        for layer, detections, events, severity in event_store.summarise_event_layers(
            session, run_id, worst
        )
    ]
    last_event = None
    if latest:
        attached = incidents_by_event(session, run_id, latest)
        last_event = _event_out(latest[0], attached.get(latest[0].id, []))
    return RunHealthOut(
        run_id=run_id,
        status=RunStatus(run.status),
        verdict=_verdict(session, run, recent_steps),
        last_step=run.last_step,
        last_ingest_at=run.last_ingest_at,
        detections={
            rule.value: {s.value: counts.get((rule.value, s.value), 0) for s in Severity}
            for rule in Rule
        },
        worst_layers=worst_layers,
        last_event=last_event,
        onset=event_summary(analysed[0]) if analysed else None,
        incidents=[
            incident_out(row)
            for row in incident_store.list_incidents(session, run_id, _HEALTH_INCIDENTS)
        ],
    )


def _verdict(
    session: Session, run: Run, recent_steps: int
) -> Severity | Literal["healthy", "no_data"]:
    """The highest severity of the events that reach the run's last ``recent_steps`` steps.

    ``no_data`` for a run without a step: a monitor that recorded nothing is not healthy.
    """
    if run.last_step is None:
        return "no_data"
    start = max(run.last_step - recent_steps + 1, 0)
    for severity in sorted(Severity, reverse=True):
        where = EventFilter(severities=[severity.value], start=start)
        if event_store.list_events(session, run.id, where, None, 1):
            return severity
    return "healthy"


def _layer_health(
    layer: str, detections: int, events: int, severity: str, stats: LayerStats | None
) -> LayerHealthOut:
    return LayerHealthOut(
        layer=layer,
        detections=detections,
        events=events,
        worst_severity=Severity(severity),
        latest_grad_norm=None if stats is None else last_value(stats.last_step, stats.vlast),
        max_grad_norm=None if stats is None else max_value(stats.count, stats.vmax),
        nonfinite_values=0 if stats is None else stats.nonfinite_values,
    )


def _event_out(event: Event, incidents: list[IncidentOut]) -> EventOut:
    return EventOut(
        id=event.id,
        rule=Rule(event.rule),
        layer=event.layer or None,
        severity=Severity(event.severity),
        first_step=event.first_step,
        last_step=event.last_step,
        count=event.count,
        value=event.value,
        baseline=event.baseline,
        created_at=event.created_at,
        updated_at=event.updated_at,
        onset=onset_out(event),
        incidents=incidents,
    )


def _decode_cursor(cursor: str) -> tuple[int, int]:
    first_step, event_id = decode_cursor(cursor, (int, int), _ENDPOINT)
    return int(first_step), int(event_id)
