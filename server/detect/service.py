"""Detector events: run the detectors on each stored batch and store what they find.

The detectors themselves are pure (``detect``); this module is their storage. Per run, the
detector state is one row (``detector_states``) read and written in the ingest transaction,
under the run's lock, so a restart or another worker continues exactly where the last batch
left off. Detections of one (rule, layer) merge into one stored event while they keep coming
within the rule's cooldown (a continuation names the step its stored event ends at, so a late
batch's events, which never continue and are never continued, cannot capture it);
``detector_counts`` counts every detection, and only grows. A
run-level explosion, non-finite or loss event stores its onset analysis (``Event.onset``)
when it is created; merging never changes it.
Reading events and health back is :mod:`gradwatch.server.query.health`.

Functions take a :class:`~sqlalchemy.orm.Session`, block on the database and never commit
(the caller owns the transaction). A session belongs to one thread.
"""

from __future__ import annotations

import logging
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..store import events as event_store
from ..store.models import Event, Run
from .config import DetectorConfig
from .detector import detect
from .event import Detection, Rule, Severity, StepColumns
from .state import DetectorState

__all__ = ["detect_batch", "get_detector_config", "load_state", "set_detector_config"]

_logger = logging.getLogger(__name__)


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
    next ingested batch on, and detector state (baselines) is kept.

    When another process stores the first thresholds of the same project at the same moment
    (PostgreSQL: a unique violation once it commits), this one then replaces them: the last
    writer wins, as for a project that had some. Blocks on the database.
    """
    detectors = config.model_dump(mode="json")
    try:
        with session.begin():
            event_store.put_project_detectors(session, project, detectors, now)
    except IntegrityError:
        with session.begin():  # the other writer's row is committed: update it
            event_store.put_project_detectors(session, project, detectors, now)
    return config


def detect_batch(
    session: Session, run: Run, state: DetectorState | None, columns: StepColumns, now: datetime
) -> DetectorState:
    """Run the detectors over a stored batch and store events, counts and state.

    Call inside the ingest transaction while holding the run's lock.

    Args:
        state: The run's stored state (:func:`load_state`; or remembered, see
            ``ingest.memo``), not modified.

    Returns:
        The run's state after the batch, as stored.
    """
    config = get_detector_config(session, run.project)
    result = detect(state, columns, config)
    _store_events(session, run.id, result.events, now)
    event_store.add_detector_counts(
        session,
        run.id,
        {(rule.value, severity.value): n for (rule, severity), n in result.triggers.items() if n},
    )
    event_store.put_detector_state(session, run.id, result.state.to_bytes(), now)
    return result.state


def load_state(session: Session, run_id: str) -> DetectorState | None:
    """A run's stored detector state; None before its first batch or when unreadable."""
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
    """Insert new events; extend the stored event each continuation names (the one ending
    at its ``after_step``, which a late batch's event never is)."""
    open_events = event_store.get_events_ending_at(
        session,
        run_id,
        [
            (d.rule.value, d.layer, d.after_step)
            for d in detections
            if d.continues and d.after_step is not None
        ],
    )
    for detection in detections:
        stored = None
        if detection.continues and detection.after_step is not None:
            stored = open_events.get((detection.rule.value, detection.layer, detection.after_step))
        if stored is not None:
            _merge(stored, detection, now)
        else:
            session.add(
                Event(
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
                    onset=None if detection.onset is None else detection.onset.to_json(),
                )
            )


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
