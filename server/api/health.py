"""Liveness/readiness (``/healthz``) and Prometheus exposition (``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..schemas import HealthOut
from ..store.db import check_database
from .deps import DatabaseDep, MetricsDep

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    responses={503: {"model": HealthOut, "description": "The database does not answer."}},
)
def health(database: DatabaseDep, response: Response) -> HealthOut:
    """Report whether the server and its database answer (one trivial query)."""
    if check_database(database.engine):
        return HealthOut(status="ok", database="ok")
    response.status_code = 503
    return HealthOut(status="error", database="unavailable")


@router.get("/metrics", response_class=Response, include_in_schema=False)
def metrics(request: Request, server_metrics: MetricsDep) -> Response:
    """Prometheus exposition of stored run state and server self-metrics."""
    body, content_type = server_metrics.expose(request.headers.get("accept", ""))
    return Response(content=body, media_type=content_type)
