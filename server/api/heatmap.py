"""Heatmap endpoint: one per-layer metric of a run as a layers × step-buckets matrix."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response

from gradwatch.wire import MAX_STEP

from ..query.heatmap import MAX_BUCKETS, read_heatmap
from ..schemas import HeatmapOut
from ..store.metric import Metric
from .deps import ReadRunAccess, ReadSessionDep
from .responses import RUN_NOT_FOUND

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["series"])


@router.get("/{run_id}/heatmap", response_model=HeatmapOut, responses=RUN_NOT_FOUND)
def get_heatmap(
    run_id: UUID,
    session: ReadSessionDep,
    _principal: ReadRunAccess,
    metric: Annotated[
        Metric, Query(description="A per-layer metric (grad_norm, nonfinite, weight_norm, …).")
    ] = Metric.GRAD_NORM,
    start: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="First step.")] = None,
    end: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="Last step.")] = None,
    buckets: Annotated[
        int, Query(ge=1, le=MAX_BUCKETS, description="Most step buckets in the reply.")
    ] = 500,
) -> Response:
    """Return the maximum of a per-layer metric per layer and step bucket (a heatmap).

    Every layer, in layer order, over at most ``buckets`` equal-width step buckets of
    ``start..end`` (inclusive; omitted, the run's stored steps). Every value of a bucket is in
    its maximum, so a one-step spike always shows: wide ranges get buckets a whole number of
    1,024-step chunks or of the run's batches wide (fewer buckets than asked when the range
    holds fewer), a range zoomed in to a few thousand steps gets exact narrow buckets.
    """
    out = read_heatmap(session, str(run_id), metric, start=start, end=end, buckets=buckets)
    # Serialised by the model itself so non-finite floats travel as "NaN"/"Infinity".
    return Response(content=out.model_dump_json(), media_type="application/json")
