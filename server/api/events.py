"""Detector endpoints: a run's events, its one-look health summary and its incident bundles."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query

from gradwatch.wire import MAX_STEP

from ..detect import Rule, Severity
from ..event_schemas import EventList, IncidentList, RunHealthOut
from ..query import health, incidents
from ..schemas import NO_NUL_PATTERN
from ..store.events import EventFilter
from .deps import ReadRunAccess, ReadSessionDep
from .responses import RUN_NOT_FOUND

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["events"])


@router.get("/{run_id}/events", responses=RUN_NOT_FOUND)
def list_events(
    run_id: UUID,
    session: ReadSessionDep,
    _principal: ReadRunAccess,
    rule: Annotated[list[Rule] | None, Query(description="Only these rules (repeatable).")] = None,
    severity: Annotated[
        list[Severity] | None, Query(description="Only these severities (repeatable).")
    ] = None,
    layer: Annotated[
        str | None,
        Query(
            description="Only this layer; an empty value selects run-level events.",
            max_length=1024,
            pattern=NO_NUL_PATTERN,
        ),
    ] = None,
    start: Annotated[
        int | None, Query(ge=0, le=MAX_STEP, description="Only events reaching this step.")
    ] = None,
    end: Annotated[
        int | None, Query(ge=0, le=MAX_STEP, description="Only events starting by this step.")
    ] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    """List a run's detector events, newest first, one page at a time."""
    where = EventFilter(
        rules=None if rule is None else [r.value for r in rule],
        severities=None if severity is None else [s.value for s in severity],
        layer=layer,
        start=start,
        end=end,
    )
    return health.list_events(session, str(run_id), where, cursor, limit)


@router.get("/{run_id}/health", responses=RUN_NOT_FOUND)
def get_health(
    run_id: UUID,
    session: ReadSessionDep,
    _principal: ReadRunAccess,
    recent_steps: Annotated[
        int,
        Query(ge=1, le=MAX_STEP, description="Steps back from the last one the verdict covers."),
    ] = 1000,
    worst: Annotated[int, Query(ge=0, le=100, description="Most layers listed.")] = 5,
) -> RunHealthOut:
    """Summarise a run's gradient health: verdict, detections by rule, worst layers, last event."""
    return health.get_run_health(session, str(run_id), recent_steps, worst)


@router.get("/{run_id}/incidents", responses=RUN_NOT_FOUND)
def list_incidents(
    run_id: UUID, session: ReadSessionDep, _principal: ReadRunAccess
) -> IncidentList:
    """List the incident bundles the agent wrote for a run (where they lie on the training
    host, their size and the command that replays them), by step."""
    return incidents.list_incidents(session, str(run_id))
