"""Series endpoint: one metric of a run or layer, raw or downsampled."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from gradwatch.wire import MAX_STEP

from ..query.series import MAX_POINTS, read_series
from ..schemas import NO_NUL_PATTERN, SeriesOut
from ..store.metric import Metric
from .deps import ReadRunAccess, ReadSessionDep
from .responses import RUN_NOT_FOUND, error

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["series"])


@router.get(
    "/{run_id}/series",
    response_model=SeriesOut,
    responses={
        **RUN_NOT_FOUND,
        404: error("No such run or layer (code `run_not_found`, `layer_not_found`)."),
    },
)
def get_series(
    run_id: UUID,
    session: ReadSessionDep,
    _principal: ReadRunAccess,
    metric: Metric,
    layer: Annotated[
        str | None,
        Query(
            description="Required for per-layer metrics.", max_length=1024, pattern=NO_NUL_PATTERN
        ),
    ] = None,
    start: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="First step.")] = None,
    end: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="Last step.")] = None,
    max_points: Annotated[
        int,
        Query(ge=1, le=MAX_POINTS, description="Most values or buckets in the reply."),
    ] = 2000,
    raw: Annotated[
        bool,
        Query(description="Raw values only, max_points per page; follow next_start."),
    ] = False,
) -> Response:
    """Return a series' values in a step range, or at most ``max_points`` min/max buckets.

    ``start`` and ``end`` are inclusive steps; omitted, the range is open on that side. With
    ``raw=true`` the reply is always raw values: the first ``max_points`` of the range and
    ``next_start`` (the ``start`` of the next page) while more follow.
    """
    out = read_series(
        session,
        str(run_id),
        metric,
        layer,
        start=start,
        end=end,
        max_points=max_points,
        raw=raw,
    )
    # Serialised by the model itself: a TypeAdapter of the union would write non-finite
    # floats as null instead of "NaN"/"Infinity"/"-Infinity".
    return Response(content=out.model_dump_json(), media_type="application/json")
