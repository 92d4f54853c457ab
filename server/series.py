"""Series queries: stored values of one metric of a run or layer, raw or bucketed.

:func:`bucket_series` is the one place that downsamples; it is vectorised NumPy
(``reduceat`` over bucket boundaries), never a Python loop per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from gradwatch.server import repository
from gradwatch.server.block import decode_blocks
from gradwatch.server.errors import InvalidQueryError, LayerNotFoundError, RunNotFoundError
from gradwatch.server.metric import METRICS, Metric, MetricKind, Scope
from gradwatch.server.repository import RUN_LEVEL
from gradwatch.server.schemas import BucketedSeriesOut, RawSeriesOut

__all__ = ["Buckets", "bucket_series", "read_series"]


@dataclass(frozen=True, slots=True)
class Buckets:
    """Equal-width step buckets (non-empty ones only), in step order.

    Attributes:
        width: Steps per bucket.
        start: First step of each bucket.
        min: Minimum over the bucket's non-NaN values (NaN if all are NaN).
        max: Maximum over the bucket's non-NaN values (NaN if all are NaN).
        last: Value at the bucket's last stored step.
        count: Stored values in the bucket.
    """

    width: int
    start: NDArray[np.int64]
    min: NDArray[np.generic]
    max: NDArray[np.generic]
    last: NDArray[np.generic]
    count: NDArray[np.int64]


def bucket_series(
    steps: NDArray[np.int64], values: NDArray[np.generic], max_buckets: int
) -> Buckets:
    """Summarise a series into at most ``max_buckets`` equal-width step buckets.

    Buckets tile ``steps[0] .. steps[-1]`` with width ``ceil(span / max_buckets)``; a one-step
    spike always shows in ``max``. Pure, thread-safe.

    Args:
        steps: Strictly increasing steps, at least one.
        values: Values at those steps (float with NaN allowed, or int).
        max_buckets: Upper bound on the number of buckets, ≥ 1.
    """
    first = int(steps[0])
    span = int(steps[-1]) - first + 1
    width = -(-span // max_buckets)
    index = (steps - first) // width
    starts = np.flatnonzero(np.concatenate(([True], index[1:] != index[:-1])))
    count = np.diff(np.append(starts, len(steps))).astype(np.int64)
    if np.issubdtype(values.dtype, np.floating):
        nan = np.isnan(values)
        low = np.minimum.reduceat(np.where(nan, np.inf, values), starts)
        high = np.maximum.reduceat(np.where(nan, -np.inf, values), starts)
        all_nan = np.add.reduceat(nan, starts, dtype=np.int64) == count
        low[all_nan] = np.nan
        high[all_nan] = np.nan
    else:
        low = np.minimum.reduceat(values, starts)
        high = np.maximum.reduceat(values, starts)
    return Buckets(
        width=width,
        start=first + index[starts] * width,
        min=low,
        max=high,
        last=values[starts + count - 1],
        count=count,
    )


def read_series(
    session: Session,
    run_id: str,
    metric: Metric,
    layer: str | None,
    *,
    start: int | None = None,
    end: int | None = None,
    max_points: int = 2000,
) -> RawSeriesOut | BucketedSeriesOut:
    """Return the stored values of a series in ``start..end`` (inclusive, optional bounds).

    Raw values when the range holds at most ``max_points`` of them, else at most
    ``max_points`` buckets (see :func:`bucket_series`). Blocks on the database.

    Raises:
        InvalidQueryError: ``layer`` missing for a per-layer metric, given for a run-level
            one, or ``start > end``.
        RunNotFoundError: No run has this id.
        LayerNotFoundError: The run has no such layer.
    """
    spec = METRICS[metric]
    if spec.scope is Scope.LAYER and layer is None:
        raise InvalidQueryError(
            f"layer: metric {metric.value!r} is per layer; pass layer=<name> "
            f"(see GET /api/v1/runs/{run_id}/layers)"
        )
    if spec.scope is Scope.RUN and layer is not None:
        raise InvalidQueryError(f"layer: metric {metric.value!r} is run-level; omit layer")
    if start is not None and end is not None and start > end:
        raise InvalidQueryError(f"start: {start} is after end {end}")
    if repository.get_run(session, run_id) is None:
        raise RunNotFoundError(run_id)
    series_id = repository.find_series_id(session, run_id, metric, layer or RUN_LEVEL)
    if series_id is None and layer is not None and not repository.has_layer(session, run_id, layer):
        raise LayerNotFoundError(run_id, layer)
    blocks = [] if series_id is None else repository.fetch_blocks(session, series_id, start, end)
    steps, values = decode_blocks(blocks, spec.kind)
    inside = np.ones(len(steps), dtype=np.bool_)
    if start is not None:
        inside &= steps >= start
    if end is not None:
        inside &= steps <= end
    steps, values = steps[inside], values[inside]
    if len(steps) <= max_points:
        return RawSeriesOut(
            run_id=run_id,
            metric=metric,
            layer=layer,
            step=steps.tolist(),
            value=_to_list(values, spec.kind),
        )
    buckets = bucket_series(steps, values, max_points)
    return BucketedSeriesOut(
        run_id=run_id,
        metric=metric,
        layer=layer,
        bucket_width=buckets.width,
        step=buckets.start.tolist(),
        min=_to_list(buckets.min, spec.kind),
        max=_to_list(buckets.max, spec.kind),
        last=_to_list(buckets.last, spec.kind),
        count=buckets.count.tolist(),
    )


def _to_list(values: NDArray[np.generic], kind: MetricKind) -> list[float | int]:
    """Python floats (float metrics) or ints (count metrics)."""
    if kind is MetricKind.COUNT:
        return values.astype(np.int64).tolist()  # type: ignore[no-any-return]
    return values.astype(np.float64).tolist()  # type: ignore[no-any-return]
