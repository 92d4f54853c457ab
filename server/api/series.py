"""Series endpoint: one metric of a run or layer, raw or downsampled."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from gradwatch.server.api.deps import ReadSessionDep
from gradwatch.server.metric import Metric
from gradwatch.server.schemas import ErrorOut, SeriesOut
from gradwatch.server.series import read_series

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["series"])

_MAX_STEP = 2**63 - 1


@router.get(
    "/{run_id}/series",
    response_model=SeriesOut,
    responses={404: {"model": ErrorOut, "description": "No such run or layer."}},
)
def get_series(
    run_id: UUID,
    session: ReadSessionDep,
    metric: Metric,
    layer: Annotated[str | None, Query(description="Required for per-layer metrics.")] = None,
    start: Annotated[int | None, Query(ge=0, le=_MAX_STEP, description="First step.")] = None,
    end: Annotated[int | None, Query(ge=0, le=_MAX_STEP, description="Last step.")] = None,
    max_points: Annotated[int, Query(ge=1, le=10_000)] = 2000,
) -> Response:
    """Return a series' values in a step range, or at most ``max_points`` min/max buckets.

    ``start`` and ``end`` are inclusive steps; omitted, the range is open on that side.
    """
    out = read_series(
        session, str(run_id), metric, layer, start=start, end=end, max_points=max_points
    )
    # Serialised by the model itself: a TypeAdapter of the union would write non-finite
    # floats as null instead of "NaN"/"Infinity"/"-Infinity".
    return Response(content=out.model_dump_json(), media_type="application/json")
