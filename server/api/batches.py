"""Batch ingest endpoint."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends

from gradwatch.wire.binary import MEDIA_TYPE

from ..ingest.batch import IngestOptions, ingest_batch
from ..ingest.columns import BatchColumns
from ..schemas import BatchAck, StepBatch
from .deps import IngestRunAccess, MetricsDep, SettingsDep, WriteSessionDep
from .responses import RUN_NOT_FOUND, WRITE, error
from .route import IngestRoute, batch_body

__all__ = ["add_body_schema", "router"]

router = APIRouter(prefix="/api/v1/runs", tags=["batches"], route_class=IngestRoute)


_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/StepBatch"}},
            MEDIA_TYPE: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": (
                        "The same batch as MessagePack, numeric columns as raw little-endian "
                        "arrays (see README, 'Binary batches')."
                    ),
                }
            },
        },
    }
}
"""The body in OpenAPI (FastAPI only sees the dependency); ``StepBatch`` is added to the
components by ``create_app``."""


@router.post(
    "/{run_id}/batches",
    openapi_extra=_BODY,
    responses={
        **WRITE,
        **RUN_NOT_FOUND,
        409: error("Overlaps stored steps without being a resend (code `batch_conflict`)."),
    },
)
def post_batch(
    run_id: UUID,
    batch: Annotated[BatchColumns, Depends(batch_body)],
    session: WriteSessionDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    _principal: IngestRunAccess,
) -> BatchAck:
    """Store one ``StepBatch`` (JSON or binary, ``Content-Encoding: gzip`` or identity),
    idempotently.

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


def add_body_schema(openapi: dict[str, Any]) -> None:
    """Add ``StepBatch`` (and the models it refers to) to an OpenAPI document's components,
    as FastAPI writes a declared body's schema."""
    schema = StepBatch.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="validation"
    )
    models = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in schema.pop("$defs", {}).items():
        models.setdefault(name, definition)
    models["StepBatch"] = schema
