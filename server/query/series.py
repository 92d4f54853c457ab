"""Series queries: stored values of one metric of a run or layer, raw or bucketed.

Downsampling aggregates block summaries in SQL: the blocks that lie inside one bucket are
folded per bucket by the database (``series_store.bucket_inner_blocks``: count, min of
``vmin``, max of ``vmax``, ``vlast`` of the last block), so at most one row per bucket reaches
Python. Only blocks cut by a bucket edge or by ``start``/``end`` are fetched with their packed
values and decoded. A 2000-bucket query over 10⁶ steps stored in 50-step blocks thus reads no
blob at all. :func:`aggregate_buckets` merges both kinds of pieces; it is vectorised NumPy
(``reduceat`` over bucket boundaries), never a Python loop per sample or per block.

Raw reads (``raw=True``) page by step: at most ``max_points`` values from ``start`` on, and
``next_start``, the step where the next page begins (keyset paging; no offset scans).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from gradwatch.wire import MAX_STEP

from ..errors import InvalidQueryError, LayerNotFoundError, RunNotFoundError
from ..schemas import BucketedSeriesOut, RawSeriesOut
from ..store import runs as run_store
from ..store import series as series_store
from ..store.block import BlockSummaries, StoredBlock, decode_blocks
from ..store.metric import METRICS, Metric, MetricKind, Scope
from ..store.models import RUN_LEVEL

__all__ = [
    "MAX_POINTS",
    "Buckets",
    "aggregate_buckets",
    "bucket_index",
    "bucket_series",
    "read_series",
]

MAX_POINTS = 10_000
"""Hard cap on the values or buckets of one reply."""

_NO_STEP = np.iinfo(np.int64).max


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
    min: NDArray[np.float64]
    max: NDArray[np.float64]
    last: NDArray[np.float64]
    count: NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class _Pieces:
    """Pre-aggregated pieces of a series: whole blocks and single decoded values.

    ``position`` is the step of a piece's last value; ``valid`` its non-NaN values; ``low``
    and ``high`` are NaN when ``valid`` is 0.
    """

    first: NDArray[np.int64]
    position: NDArray[np.int64]
    count: NDArray[np.int64]
    valid: NDArray[np.int64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    last: NDArray[np.float64]

    @staticmethod
    def of_values(steps: NDArray[np.int64], values: NDArray[np.generic]) -> _Pieces:
        wide = values.astype(np.float64)
        nan = np.isnan(wide)
        return _Pieces(
            first=steps,
            position=steps,
            count=np.ones(len(steps), dtype=np.int64),
            valid=(~nan).astype(np.int64),
            low=wide,
            high=wide,
            last=wide,
        )

    @staticmethod
    def of_blocks(blocks: BlockSummaries) -> _Pieces:
        return _Pieces(
            first=blocks.first_step,
            position=blocks.last_step,
            count=blocks.count,
            valid=blocks.count - blocks.nan_count,
            low=blocks.vmin,
            high=blocks.vmax,
            last=blocks.vlast,
        )

    @staticmethod
    def concatenate(parts: list[_Pieces]) -> _Pieces:
        joined = _Pieces(
            *(np.concatenate([getattr(part, name) for part in parts]) for name in _Pieces.__slots__)
        )
        order = np.argsort(joined.position, kind="stable")
        return _Pieces(*(getattr(joined, name)[order] for name in _Pieces.__slots__))


def aggregate_buckets(pieces: _Pieces, origin: int, width: int) -> Buckets:
    """Fold pieces (sorted by position, each inside one bucket) into buckets of ``width``.

    Pure NumPy, thread-safe.
    """
    index = bucket_index(pieces.first, origin, width)
    starts = np.flatnonzero(np.concatenate(([True], index[1:] != index[:-1])))
    ends = np.append(starts[1:], len(index)) - 1
    valid = np.add.reduceat(pieces.valid, starts)
    with np.errstate(invalid="ignore"):
        low = np.minimum.reduceat(np.where(pieces.valid > 0, pieces.low, np.inf), starts)
        high = np.maximum.reduceat(np.where(pieces.valid > 0, pieces.high, -np.inf), starts)
    low[valid == 0] = np.nan
    high[valid == 0] = np.nan
    return Buckets(
        width=width,
        # index is 0 wherever width exceeds int64, so the product never overflows.
        start=origin + index[starts] * min(width, MAX_STEP),
        min=low,
        max=high,
        last=pieces.last[ends],
        count=np.add.reduceat(pieces.count, starts),
    )


def bucket_index(steps: NDArray[np.int64], origin: int, width: int) -> NDArray[np.int64]:
    """Bucket of each step (≥ ``origin``); ``width`` is a Python int and may exceed int64.

    Offsets fit int64 (steps are 0..``MAX_STEP``); a width above ``MAX_STEP`` (2⁶³: one
    bucket over every possible step) is wider than any offset, so every step is in bucket 0.
    """
    offsets = steps - np.int64(origin)
    if width > MAX_STEP:
        return np.zeros_like(offsets)
    return offsets // np.int64(width)


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
    width = _width(first, int(steps[-1]), max_buckets)
    return aggregate_buckets(_Pieces.of_values(steps, values), first, width)


def _width(first: int, last: int, max_buckets: int) -> int:
    """Steps per bucket so that at most ``max_buckets`` tile ``first..last``.

    Python ints throughout: for ``0..MAX_STEP`` and one bucket the width is 2⁶³, beyond int64
    (see :func:`bucket_index` and ``series_store.bucket_inner_blocks``).
    """
    return -(-(last - first + 1) // max_buckets)


def read_series(
    session: Session,
    run_id: str,
    metric: Metric,
    layer: str | None,
    *,
    start: int | None = None,
    end: int | None = None,
    max_points: int = 2000,
    raw: bool = False,
) -> RawSeriesOut | BucketedSeriesOut:
    """Return the stored values of a series in ``start..end`` (inclusive, optional bounds).

    Raw values when the range holds at most ``max_points`` of them, else at most
    ``max_points`` buckets (see :func:`bucket_series`). With ``raw``, always raw values: the
    first ``max_points`` of the range, and ``next_start`` when more follow. Blocks on the
    database (four to six indexed queries over primary-key ranges).

    Raises:
        InvalidQueryError: ``layer`` missing for a per-layer metric, given for a run-level
            one, ``start > end``, or ``max_points`` outside 1..:data:`MAX_POINTS`.
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
    if not 1 <= max_points <= MAX_POINTS:
        raise InvalidQueryError(f"max_points: {max_points} is not in 1..{MAX_POINTS}")
    if run_store.get_run(session, run_id) is None:
        raise RunNotFoundError(run_id)
    series_id = series_store.find_series_id(session, run_id, metric, layer or RUN_LEVEL)
    if (
        series_id is None
        and layer is not None
        and not series_store.has_layer(session, run_id, layer)
    ):
        raise LayerNotFoundError(run_id, layer)

    def raw_out(
        steps: NDArray[np.int64], values: NDArray[np.generic], next_start: int | None = None
    ) -> RawSeriesOut:
        return RawSeriesOut(
            run_id=run_id,
            metric=metric,
            layer=layer,
            step=steps.tolist(),
            value=_to_list(values, spec.kind),
            next_start=next_start,
        )

    if series_id is None:
        return raw_out(np.zeros(0, dtype=np.int64), np.zeros(0))
    lo = 0 if start is None else start
    hi = _NO_STEP if end is None else end
    if raw:
        steps, values, next_start = _read_page(session, series_id, spec.kind, lo, hi, max_points)
        return raw_out(steps, values, next_start)
    inner_count, inner_first, inner_last = series_store.count_inner_blocks(
        session, series_id, lo, hi
    )
    cut_steps, cut_values = _decode_inside(
        series_store.fetch_cut_blocks(session, series_id, lo, hi), spec.kind, lo, hi
    )
    if inner_count + len(cut_steps) <= max_points:
        stored = series_store.fetch_blocks(session, series_id, start, end)
        return raw_out(*_decode_inside(stored, spec.kind, lo, hi))
    first = min(inner_first if inner_count else _NO_STEP, _first_or_none(cut_steps))
    last = max(inner_last if inner_count else -1, _last_or_none(cut_steps))
    width = _width(first, last, max_points)
    whole = series_store.bucket_inner_blocks(session, series_id, lo, hi, first, width)
    split_steps, split_values = _decode_inside(
        series_store.fetch_split_blocks(session, series_id, lo, hi, first, width), spec.kind, lo, hi
    )
    pieces = _Pieces.concatenate(
        [
            _Pieces.of_blocks(whole),
            _Pieces.of_values(cut_steps, cut_values),
            _Pieces.of_values(split_steps, split_values),
        ]
    )
    buckets = aggregate_buckets(pieces, first, width)
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


def _first_or_none(steps: NDArray[np.int64]) -> int:
    return int(steps[0]) if len(steps) else _NO_STEP


def _last_or_none(steps: NDArray[np.int64]) -> int:
    return int(steps[-1]) if len(steps) else -1


def _decode_inside(
    blocks: Sequence[StoredBlock], kind: MetricKind, lo: int, hi: int
) -> tuple[NDArray[np.int64], NDArray[np.generic]]:
    """Decode blocks of one series; keep the values in ``lo..hi``."""
    steps, values = decode_blocks(blocks, kind)
    inside = (steps >= lo) & (steps <= hi)
    return steps[inside], values[inside]


def _read_page(
    session: Session, series_id: int, kind: MetricKind, lo: int, hi: int, limit: int
) -> tuple[NDArray[np.int64], NDArray[np.generic], int | None]:
    """Return the first ``limit`` values in ``lo..hi`` and the step after them, if any.

    Reads at most ``limit + 2`` block summaries and only the blobs of the blocks needed.
    """
    end = None if hi == _NO_STEP else hi
    summaries = series_store.fetch_block_summaries(session, series_id, lo, end, limit=limit + 2)
    if not len(summaries):
        return np.zeros(0, dtype=np.int64), np.zeros(0), None
    # Values before lo in the first block do not count; every block holds at least one value.
    needed = limit + 1 + (int(summaries.count[0]) if summaries.first_step[0] < lo else 0)
    enough = np.flatnonzero(np.cumsum(summaries.count) >= needed)
    last_block = int(enough[0]) if len(enough) else len(summaries) - 1
    blocks = series_store.fetch_blocks(
        session, series_id, int(summaries.first_step[0]), int(summaries.first_step[last_block])
    )
    steps, values = _decode_inside(blocks, kind, lo, hi)
    next_start = int(steps[limit]) if len(steps) > limit else None
    return steps[:limit], values[:limit], next_start


def _to_list(values: NDArray[np.generic], kind: MetricKind) -> list[float | int]:
    """Python floats (float metrics) or ints (count metrics)."""
    if kind is MetricKind.COUNT:
        return values.astype(np.int64).tolist()  # type: ignore[no-any-return]
    return values.astype(np.float64).tolist()  # type: ignore[no-any-return]
