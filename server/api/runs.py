"""Run endpoints: create, list, get, set status, layers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response, status

from ..query import run
from ..schemas import (
    NO_NUL_PATTERN,
    PROJECT_PATTERN,
    LayersOut,
    RunCreate,
    RunList,
    RunOut,
    RunPatch,
    RunStatus,
)
from .deps import (
    IngestAccess,
    IngestRunAccess,
    ReadAccess,
    ReadRunAccess,
    ReadSessionDep,
    WriteSessionDep,
)
from .responses import READ, RUN_NOT_FOUND, WRITE
from .route import DecodedBodyRoute

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["runs"], route_class=DecodedBodyRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        **WRITE,
        200: {"model": RunOut, "description": "The run already existed (unchanged)."},
    },
)
def create_run(
    body: RunCreate, session: WriteSessionDep, response: Response, principal: IngestAccess
) -> RunOut:
    """Create a run from a client-made uuid; idempotent (200 with the stored run if it exists)."""
    principal.check_project(body.project)
    out, created = run.create_run(session, body, datetime.now(UTC))
    principal.check_project(out.project)
    if not created:
        response.status_code = status.HTTP_200_OK
    return out


@router.get("", responses=READ)
def list_runs(
    session: ReadSessionDep,
    principal: ReadAccess,
    project: Annotated[
        str | None, Query(description="Exact project.", pattern=PROJECT_PATTERN)
    ] = None,
    status: Annotated[RunStatus | None, Query(description="Exact status.")] = None,
    name: Annotated[
        str | None,
        Query(
            description="Case-insensitive name substring.", max_length=200, pattern=NO_NUL_PATTERN
        ),
    ] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> RunList:
    """List runs, newest first, one page at a time (a token sees its own project only)."""
    if principal.project is not None:
        principal.check_project(principal.project if project is None else project)
        project = principal.project
    return run.list_runs(
        session, project=project, status=status, name_contains=name, cursor=cursor, limit=limit
    )


@router.get("/{run_id}", responses=RUN_NOT_FOUND)
def get_run(run_id: UUID, session: ReadSessionDep, _principal: ReadRunAccess) -> RunOut:
    """Return one run with its totals."""
    return run.get_run(session, str(run_id))


@router.patch("/{run_id}", responses={**WRITE, **RUN_NOT_FOUND})
def patch_run(
    run_id: UUID, body: RunPatch, session: WriteSessionDep, _principal: IngestRunAccess
) -> RunOut:
    """Set a run's status (running, finished or failed)."""
    return run.set_run_status(session, str(run_id), body.status, datetime.now(UTC))


@router.get("/{run_id}/layers", responses=RUN_NOT_FOUND)
def list_layers(run_id: UUID, session: ReadSessionDep, _principal: ReadRunAccess) -> LayersOut:
    """List a run's layers in layer order with latest and largest gradient norm."""
    return run.list_layers(session, str(run_id))
