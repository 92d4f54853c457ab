"""Detector endpoints: a run's events and its one-look health summary."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query

from ..detect import service as events
from ..detect.rules import Rule, Severity
from ..schemas import NO_NUL_PATTERN, ErrorOut, EventList, RunHealthOut
from ..store.repository import EventFilter
from .deps import ReadRunAccess, ReadSessionDep

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["events"])

_MAX_STEP = 2**63 - 1
_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "A token is required, or it is not valid."},
    403: {"model": ErrorOut, "description": "The token lacks the scope or the project."},
    404: {"model": ErrorOut, "description": "No run has this id."},
    429: {"model": ErrorOut, "description": "Rate limit; retry after Retry-After seconds."},
}


@router.get("/{run_id}/events", responses=_RESPONSES)
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
        int | None, Query(ge=0, le=_MAX_STEP, description="Only events reaching this step.")
    ] = None,
    end: Annotated[
        int | None, Query(ge=0, le=_MAX_STEP, description="Only events starting by this step.")
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
    return events.list_events(session, str(run_id), where, cursor, limit)


@router.get("/{run_id}/health", responses=_RESPONSES)
def get_health(
    run_id: UUID,
    session: ReadSessionDep,
    _principal: ReadRunAccess,
    recent_steps: Annotated[
        int,
        Query(ge=1, le=_MAX_STEP, description="Steps back from the last one the verdict covers."),
    ] = 1000,
    worst: Annotated[int, Query(ge=0, le=100, description="Most layers listed.")] = 5,
) -> RunHealthOut:
    """Summarise a run's gradient health: verdict, detections by rule, worst layers, last event."""
    return events.get_run_health(session, str(run_id), recent_steps, worst)
