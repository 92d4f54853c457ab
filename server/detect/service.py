"""Detector events: run the detectors on each stored batch, store what they find, read it back.

The detectors themselves are pure (``detect``); this module is their storage. Per run, the
detector state is one row (``detector_states``) read and written in the ingest transaction,
under the run's lock, so a restart or another worker continues exactly where the last batch
left off. Detections of one (rule, layer) merge into one stored event while they keep coming
within the rule's cooldown; ``detector_counts`` counts every detection, and only grows.

Functions take a :class:`~sqlalchemy.orm.Session`, block on the database and never commit
(the caller owns the transaction). A session belongs to one thread.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Literal

from pydantic import ValidationError
from sqlalchemy.orm import Session

from ..errors import RunNotFoundError
from ..query.cursor import decode_cursor, encode_cursor
from ..query.summary import last_value, max_value
from ..schemas import EventList, EventOut, LayerHealthOut, RunHealthOut
from ..store import events as event_store
from ..store import runs as run_store
from ..store import series as series_store
from ..store.events import EventFilter
from ..store.models import Event, Run, RunStatus
from ..store.series import LayerStats
from .config import DetectorConfig
from .detector import detect
from .event import Detection, Rule, Severity, StepColumns
from .state import DetectorState

__all__ = [
    "detect_batch",
    "get_detector_config",
    "get_run_health",
    "list_events",
    "set_detector_config",
]

_logger = logging.getLogger(__name__)
_ENDPOINT = "GET /api/v1/runs/{run_id}/events"


def get_detector_config(session: Session, project: str) -> DetectorConfig:
    """Return a project's detector thresholds: the stored ones, or the defaults."""
    stored = event_store.get_project_detectors(session, project)
    if stored is None:
        return DetectorConfig()
    try:
        return DetectorConfig.model_validate(stored)
    except ValidationError:
        # Written by an older server whose thresholds model has since changed: keep detecting.
        _logger.warning("project %s: stored detector thresholds no longer valid", project)
        return DetectorConfig()


def set_detector_config(
    session: Session, project: str, config: DetectorConfig, now: datetime
) -> DetectorConfig:
    """Store a project's thresholds in one transaction (committed here); they apply from the
    next ingested batch on, and detector state (baselines) is kept."""
    with session.begin():
        event_store.put_project_detectors(session, project, config.model_dump(mode="json"), now)
    return config


def detect_batch(session: Session, run: Run, columns: StepColumns, now: datetime) -> None:
    """Run the detectors over a stored batch and store events, counts and state.

    Call inside the ingest transaction while holding the run's lock.
    """
    config = get_detector_config(session, run.project)
    result = detect(_load_state(session, run.id), columns, config)
    _store_events(session, run.id, result.events, now)
    event_store.add_detector_counts(
        session,
        run.id,
        {(rule.value, severity.value): n for (rule, severity), n in result.triggers.items() if n},
    )
    event_store.put_detector_state(session, run.id, result.state.to_bytes(), now)


def _load_state(session: Session, run_id: str) -> DetectorState | None:
    raw = event_store.get_detector_state(session, run_id)
    if raw is None:
        return None
    try:
        return DetectorState.from_bytes(raw)
    except ValueError:
        # A state format this server does not read (written by another version): start
        # over with fresh baselines rather than refuse the run's batches.
        _logger.warning("run %s: unreadable detector state, starting fresh", run_id)
        return None


def _store_events(
    session: Session, run_id: str, detections: list[Detection], now: datetime
) -> None:
    open_events = event_store.get_latest_events(
        session, run_id, [(d.rule.value, d.layer) for d in detections if d.continues]
    )
    for detection in detections:
        stored = open_events.get((detection.rule.value, detection.layer))
        if detection.continues and stored is not None:
            _merge(stored, detection, now)
        else:
            event = Event(
                run_id=run_id,
                rule=detection.rule.value,
                layer=detection.layer,
                severity=detection.severity.value,
                first_step=detection.first_step,
                last_step=detection.last_step,
                count=detection.count,
                value=detection.value,
                baseline=detection.baseline,
                created_at=now,
                updated_at=now,
            )
            session.add(event)
            open_events[(detection.rule.value, detection.layer)] = event


def _merge(event: Event, detection: Detection, now: datetime) -> None:
    """Extend a stored event with detections that continue it."""
    event.last_step = max(event.last_step, detection.last_step)
    event.count += detection.count
    if detection.severity > Severity(event.severity):
        event.severity = detection.severity.value
    if _more_extreme(detection.rule, detection.value, event.value):
        event.value = detection.value
        event.baseline = detection.baseline
    event.updated_at = now


def _more_extreme(rule: Rule, new: float, old: float) -> bool:
    """Whether ``new`` is a worse value than ``old`` for a rule (vanishing: smaller)."""
    return new < old if rule is Rule.VANISHING else new > old


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
    return EventList(run_id=run_id, events=[_event_out(e) for e in page], next_cursor=next_cursor)


def get_run_health(session: Session, run_id: str, recent_steps: int, worst: int) -> RunHealthOut:
    """Return a one-look summary of a run's gradient health.

    ``verdict`` is the highest severity among events that reach the last ``recent_steps``
    steps of the run, or ``healthy``.

    Raises:
        RunNotFoundError: No run has this id.
    """
    run = run_store.get_run(session, run_id)
    if run is None:
        raise RunNotFoundError(run_id)
    counts = event_store.get_detector_counts(session, run_id)
    latest = event_store.list_events(session, run_id, EventFilter(), None, 1)
    layers = {stats.name: stats for stats in series_store.list_layer_stats(session, run_id)}
    worst_layers = [
        _layer_health(layer, detections, events, severity, layers.get(layer))
        for layer, detections, events, severity in event_store.summarise_event_layers(
            session, run_id, worst
        )
    ]
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
        last_event=_event_out(latest[0]) if latest else None,
    )


def _verdict(session: Session, run: Run, recent_steps: int) -> Severity | Literal["healthy"]:
    """The highest severity of the events that reach the run's last ``recent_steps`` steps."""
    if run.last_step is None:
        return "healthy"
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


def _event_out(event: Event) -> EventOut:
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
    )


def _decode_cursor(cursor: str) -> tuple[int, int]:
    first_step, event_id = decode_cursor(cursor, (int, int), _ENDPOINT)
    return int(first_step), int(event_id)
