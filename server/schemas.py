"""Pydantic models of the wire format (requests) and of every response body.

Floats on the wire are JSON numbers or exactly one of the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (the protobuf JSON convention); responses write non-finite floats the same way.
All models are immutable once validated and safe to share between threads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from gradwatch.wire import (
    LAYER_FIELDS,
    MAX_COUNT,
    MAX_STEP,
    RUN_FIELDS,
    SCHEMA_VERSION,
    decode_float,
    encode_float,
)

from .event_schemas import IncidentIn
from .freeform import check_free_json, describe_limits
from .store.metric import Metric
from .store.models import RunStatus
from .wirefloat import WireFloat

__all__ = [
    "NO_NUL_PATTERN",
    "PROJECT_PATTERN",
    "SCHEMA_VERSION",
    "BatchAck",
    "BatchHeader",
    "BucketedSeriesOut",
    "ErrorOut",
    "FieldErrorOut",
    "HealthOut",
    "HeatmapOut",
    "LayerOut",
    "LayersOut",
    "RawSeriesOut",
    "RunCreate",
    "RunList",
    "RunOut",
    "RunPatch",
    "RunStatus",
    "SeriesOut",
    "StepBatch",
    "WireFloat",
    "decode_float",
    "encode_float",
]


_Count = Annotated[StrictInt, Field(ge=0, le=MAX_COUNT)]
_Step = Annotated[StrictInt, Field(ge=0, le=MAX_STEP)]
NO_NUL_PATTERN = r"^[^\x00]*$"
"""Strings without NUL characters (PostgreSQL text cannot hold them)."""
PROJECT_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
"""Project names: letters, digits and ``._-``, 1 to 100 characters."""
_NO_NUL = NO_NUL_PATTERN
_LayerName = Annotated[StrictStr, Field(min_length=1, max_length=1024, pattern=_NO_NUL)]
_DropReason = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings", frozen=True)


class BatchHeader(_Wire):
    """The fields of a batch that are not numeric columns: the same in the JSON and the
    binary body (``gradwatch.wire.binary``), validated by the same rules."""

    schema_version: Literal[1] = Field(alias="schema", description="Wire format version: 1.")
    batch_id: UUID = Field(description="Client-made id; a resend with the same id is a no-op.")
    layers: list[_LayerName] = Field(min_length=1, description="Unique layer names.")
    dropped_batches: dict[_DropReason, _Count] | None = Field(
        default=None,
        max_length=64,
        description="Batches the agent dropped since it started, cumulative, by reason.",
    )
    incidents: list[IncidentIn] | None = Field(
        default=None, max_length=16, description="Incident bundles written since the last batch."
    )

    @field_validator("layers")
    @classmethod
    def _check_unique_layers(cls, layers: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in layers:
            if name in seen:
                raise ValueError(f"layers: {name!r} appears more than once")
            seen.add(name)
        return layers


class StepBatch(BatchHeader):
    """One batch of consecutive training steps, columnar (``schema`` 1), as JSON.

    Run-level arrays hold one entry per step; per-layer arrays one row per step with one entry
    per layer, in ``layers`` order. ``null`` entries of the optional metrics mean "not measured
    at that step". Size limits that depend on the server's settings (steps per batch, layers)
    are checked at ingest, not here. The binary body carries the same fields (see
    ``gradwatch.wire.binary``).
    """

    step: list[_Step] = Field(min_length=1, description="Strictly increasing training steps.")
    loss: list[WireFloat | None] | None = None
    global_norm: list[WireFloat] = Field(description="Global gradient L2 norm before clipping.")
    global_norm_clipped: list[WireFloat] = Field(description="Global norm after clipping.")
    clip_coef: list[WireFloat] = Field(description="Clip coefficient; < 1 means clipped.")
    skipped: list[StrictBool] = Field(description="Whether the update was skipped.")
    grad_norm: list[list[WireFloat]] = Field(description="Per-layer gradient L2 norm.")
    nonfinite: list[list[_Count]] = Field(
        description="Per-layer count of non-finite gradient values (0 ≤ count ≤ 2⁵³)."
    )
    weight_norm: list[list[WireFloat | None]] | None = None
    update_ratio: list[list[WireFloat | None]] | None = None

    @field_validator("step")
    @classmethod
    def _check_increasing(cls, steps: list[int]) -> list[int]:
        not_increasing = np.flatnonzero(np.diff(np.asarray(steps, dtype=np.int64)) <= 0)
        if not_increasing.size:
            index = int(not_increasing[0]) + 1
            raise ValueError(
                f"step: must be strictly increasing, but step[{index}] = {steps[index]} "
                f"follows step[{index - 1}] = {steps[index - 1]}"
            )
        return steps

    @field_validator(*RUN_FIELDS)
    @classmethod
    def _check_one_per_step(cls, values: list[Any] | None, info: ValidationInfo) -> Any:
        steps = info.data.get("step")
        if values is not None and steps is not None and len(values) != len(steps):
            raise ValueError(
                f"{info.field_name}: has {len(values)} values, expected {len(steps)} (one per step)"
            )
        return values

    @field_validator(*LAYER_FIELDS)
    @classmethod
    def _check_step_by_layer(cls, rows: list[list[Any]] | None, info: ValidationInfo) -> Any:
        steps = info.data.get("step")
        layers = info.data.get("layers")
        if rows is None:
            return rows
        if steps is not None and len(rows) != len(steps):
            raise ValueError(
                f"{info.field_name}: has {len(rows)} rows, expected {len(steps)} (one per step)"
            )
        if layers is not None:
            for index, row in enumerate(rows):
                if len(row) != len(layers):
                    raise ValueError(
                        f"{info.field_name}: row {index} has {len(row)} values, "
                        f"expected {len(layers)} (one per layer)"
                    )
        return rows


class RunCreate(_Wire):
    """Body of ``POST /api/v1/runs``."""

    run_id: UUID = Field(description="Client-made run id.")
    name: StrictStr = Field(min_length=1, max_length=200, pattern=_NO_NUL)
    project: StrictStr = Field(default="default", pattern=PROJECT_PATTERN)
    config: dict[str, Any] | None = Field(
        default=None,
        description=f"Free JSON object: {describe_limits()}.",
    )

    @field_validator("config")
    @classmethod
    def _check_config(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if config is not None:
            check_free_json(config, "config")
        return config


class RunPatch(_Wire):
    """Body of ``PATCH /api/v1/runs/{run_id}``."""

    status: RunStatus


class RunOut(_Out):
    """A run with its running totals.

    Attributes:
        max_global_norm: Largest global gradient norm stored (``"Infinity"`` if one was
            infinite; ``"NaN"`` if every stored value is NaN; ``null`` before any data).
        dropped_batches: The agent's latest cumulative count of dropped batches, by reason.
    """

    run_id: str
    project: str
    name: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    config: dict[str, Any] | None
    config_error: str | None = Field(
        default=None,
        description="Why the stored config is not returned (``config`` is null then): it "
        "breaks the limits on free-form JSON (stored before they existed).",
    )
    last_step: int | None
    last_ingest_at: datetime | None
    num_steps: int
    num_layers: int
    clipped_steps: int
    skipped_steps: int
    nonfinite_steps: int
    nonfinite_values: int
    max_global_norm: float | None
    dropped_batches: dict[str, int]


class RunList(_Out):
    """A page of runs, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    runs: list[RunOut]
    next_cursor: str | None


class BatchAck(_Out):
    """Reply to an ingested batch. A sample is one value of one series at one step.

    Attributes:
        duplicate: True when nothing was stored because the batch had been stored before (same
            ``batch_id``, or all of its steps already stored).
    """

    run_id: str
    batch_id: str
    steps: int
    stored_samples: int
    duplicate_samples: int
    duplicate: bool


class LayerOut(_Out):
    """Summary of one layer: latest and largest gradient norm, non-finite values seen.

    Attributes:
        latest_weight_norm: The weight norm at the last step that measured it (the agent
            measures every ``stats_every`` steps), or ``null`` when never measured.
        latest_update_ratio: The update ratio ‖Δw‖/‖w‖ at that step, or ``null``.
    """

    index: int
    name: str
    latest_grad_norm: float | None
    max_grad_norm: float | None
    nonfinite_values: int
    latest_weight_norm: float | None = None
    latest_update_ratio: float | None = None


class LayersOut(_Out):
    """The layers of a run in layer order (order of first appearance)."""

    run_id: str
    layers: list[LayerOut]


class RawSeriesOut(_Out):
    """Stored values of a series in the requested range, ``value[i]`` at ``step[i]``.

    Attributes:
        next_start: Only with ``raw=true``: more values follow; pass ``start=next_start`` for
            the next page. ``null`` when the reply holds every value of the range.
    """

    run_id: str
    metric: Metric
    layer: str | None
    downsampled: Literal[False] = False
    step: list[int]
    value: list[float | int]
    next_start: int | None = None


class BucketedSeriesOut(_Out):
    """A series summarised into equal-width step buckets (only non-empty buckets are listed).

    Bucket ``i`` covers steps ``step[i] .. step[i] + bucket_width - 1``; ``min``/``max`` ignore
    NaN unless every value in the bucket is NaN; ``last`` is the value at the bucket's last
    stored step; ``count`` is the number of stored values.
    """

    run_id: str
    metric: Metric
    layer: str | None
    downsampled: Literal[True] = True
    bucket_width: int
    step: list[int]
    min: list[float | int]
    max: list[float | int]
    last: list[float | int]
    count: list[int]


SeriesOut = Annotated[RawSeriesOut | BucketedSeriesOut, Field(discriminator="downsampled")]
"""Reply of ``GET /api/v1/runs/{run_id}/series``."""


class HeatmapOut(_Out):
    """Reply of ``GET /api/v1/runs/{run_id}/heatmap``: one per-layer metric, layers × buckets.

    Bucket ``j`` covers steps ``step[j] .. step[j] + bucket_width - 1`` (every bucket of the
    range is listed, empty ones too). ``max[i][j]`` is the largest value of layer ``layers[i]``
    in bucket ``j`` to four significant digits: NaN values are ignored unless every value of
    the cell is NaN (then ``"NaN"``), ``"Infinity"`` when one overflowed, ``null`` when the
    cell holds no value. ``nan_cells`` lists ``[layer index, bucket index, NaN values]`` for
    every cell holding at least one NaN.

    Attributes:
        start: First step of the range covered (``null`` when nothing is stored).
        end: Last step of the range covered.
    """

    run_id: str
    metric: Metric
    start: int | None
    end: int | None
    bucket_width: int
    step: list[int]
    layers: list[str]
    max: list[list[float | None]]
    nan_cells: list[list[int]]


class HealthOut(_Out):
    """Reply of ``GET /healthz``."""

    status: Literal["ok", "error"]
    database: Literal["ok", "unavailable"]


class FieldErrorOut(BaseModel):
    """One invalid field of a request (in a 422 reply's ``errors``)."""

    type: str = Field(description="Machine-readable kind, e.g. 'missing', 'json_invalid'.")
    loc: list[str | int] = Field(description="Where: 'body', 'query' or 'path', then the field.")
    msg: str = Field(description="What is wrong, for a person.")


class ErrorOut(BaseModel):
    """Body of every error reply, whatever its status.

    Attributes:
        code: Stable machine-readable slug (``invalid``, ``invalid_query``, ``run_not_found``,
            ``unauthenticated``, ``rate_limited``, …).
        detail: What went wrong, for a person; names the offending field first
            (``field: ...``).
        errors: With ``code`` ``invalid`` (422): the invalid fields, at most 20.
        error_count: With ``errors``: how many fields were invalid in all.
    """

    code: str
    detail: str
    errors: list[FieldErrorOut] | None = None
    error_count: int | None = None
