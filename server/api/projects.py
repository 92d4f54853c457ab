"""Project endpoints: detector thresholds per project (and per layer name pattern)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path

from ..detect import DetectorConfig
from ..detect import service as events
from ..schemas import PROJECT_PATTERN
from .deps import IngestAccess, ReadAccess, ReadSessionDep, WriteSessionDep
from .responses import READ, WRITE
from .route import DecodedBodyRoute

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/projects", tags=["projects"], route_class=DecodedBodyRoute)

_Project = Annotated[str, Path(pattern=PROJECT_PATTERN)]


@router.get("/{project}/detectors", responses=READ)
def get_detectors(
    project: _Project, session: ReadSessionDep, principal: ReadAccess
) -> DetectorConfig:
    """Return a project's detector thresholds (the defaults until some are set)."""
    principal.check_project(project)
    return events.get_detector_config(session, project)


@router.put("/{project}/detectors", responses=WRITE)
def put_detectors(
    project: _Project, body: DetectorConfig, session: WriteSessionDep, principal: IngestAccess
) -> DetectorConfig:
    """Replace a project's detector thresholds; they apply from the next ingested batch on.

    Runs keep their baselines. Fields left out take their defaults; per-layer overrides
    (``layers``, first matching glob wins) override only the fields they give.
    """
    principal.check_project(project)
    return events.set_detector_config(session, project, body, datetime.now(UTC))
