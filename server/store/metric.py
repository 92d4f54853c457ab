"""The registry of stored metrics: the one table that ingest, queries and validation share.

Every series gradwatch stores is one :class:`Metric` of one run (``Scope.RUN``) or of one
layer of a run (``Scope.LAYER``). The wire key of a metric in a ``StepBatch`` is its name.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "LAYER_ORDER_METRIC",
    "METRICS",
    "Metric",
    "MetricKind",
    "MetricSpec",
    "Scope",
]


class Metric(enum.StrEnum):
    """Names of the stored metrics (also their wire keys and ``series.metric`` values)."""

    LOSS = "loss"
    GLOBAL_NORM = "global_norm"
    GLOBAL_NORM_CLIPPED = "global_norm_clipped"
    CLIP_COEF = "clip_coef"
    SKIPPED = "skipped"
    GRAD_NORM = "grad_norm"
    NONFINITE = "nonfinite"
    WEIGHT_NORM = "weight_norm"
    UPDATE_RATIO = "update_ratio"


class Scope(enum.Enum):
    """Whether a metric has one value per step (``RUN``) or one per layer and step (``LAYER``)."""

    RUN = "run"
    LAYER = "layer"


class MetricKind(enum.Enum):
    """How values are packed in a block: little-endian float32 or little-endian int64."""

    FLOAT = "<f4"
    COUNT = "<i8"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """How one metric travels and is stored.

    Attributes:
        metric: The metric name.
        scope: Run-level or per-layer.
        kind: Float (float32, may be non-finite) or count (int64, non-negative).
        required: Whether every ``StepBatch`` must carry it; optional metrics may be absent or
            hold ``null`` entries (not measured at that step).
    """

    metric: Metric
    scope: Scope
    kind: MetricKind
    required: bool


METRICS: Mapping[Metric, MetricSpec] = MappingProxyType(
    {
        spec.metric: spec
        for spec in (
            MetricSpec(Metric.LOSS, Scope.RUN, MetricKind.FLOAT, required=False),
            MetricSpec(Metric.GLOBAL_NORM, Scope.RUN, MetricKind.FLOAT, required=True),
            MetricSpec(Metric.GLOBAL_NORM_CLIPPED, Scope.RUN, MetricKind.FLOAT, required=True),
            MetricSpec(Metric.CLIP_COEF, Scope.RUN, MetricKind.FLOAT, required=True),
            MetricSpec(Metric.SKIPPED, Scope.RUN, MetricKind.COUNT, required=True),
            MetricSpec(Metric.GRAD_NORM, Scope.LAYER, MetricKind.FLOAT, required=True),
            MetricSpec(Metric.NONFINITE, Scope.LAYER, MetricKind.COUNT, required=True),
            MetricSpec(Metric.WEIGHT_NORM, Scope.LAYER, MetricKind.FLOAT, required=False),
            MetricSpec(Metric.UPDATE_RATIO, Scope.LAYER, MetricKind.FLOAT, required=False),
        )
    }
)
"""Every stored metric, in wire order. Read-only."""

LAYER_ORDER_METRIC = Metric.GRAD_NORM
"""The per-layer metric whose series creation order defines the layer order of a run."""
