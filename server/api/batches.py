"""Batch ingest endpoint."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from fastapi import APIRouter

from ..ingest.batch import IngestOptions, ingest_batch
from ..schemas import BatchAck, StepBatch
from .deps import IngestRunAccess, MetricsDep, SettingsDep, WriteSessionDep
from .responses import RUN_NOT_FOUND, WRITE, error
from .route import IngestRoute

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["batches"], route_class=IngestRoute)


@router.post(
    "/{run_id}/batches",
    responses={
        **WRITE,
        **RUN_NOT_FOUND,
        409: error("Overlaps stored steps without being a resend (code `batch_conflict`)."),
    },
)
def post_batch(
    run_id: UUID,
    batch: StepBatch,
    session: WriteSessionDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    _principal: IngestRunAccess,
) -> BatchAck:
    """Store one ``StepBatch`` (JSON, ``Content-Encoding: gzip`` or identity), idempotently.

    A resend (same ``batch_id``, or steps all stored already) stores nothing and says
    ``duplicate: true``.
    """
    ack = ingest_batch(
        session,
        str(run_id),
        batch,
        IngestOptions(
            max_steps=settings.max_steps_per_batch,
            max_layers=settings.max_layers,
            norm_window_seconds=settings.norm_window_seconds,
            top_k_layers=settings.metrics_top_k_layers,
        ),
        datetime.now(UTC),
    )
    metrics.ingest_samples.inc(ack.stored_samples)
    return ack
