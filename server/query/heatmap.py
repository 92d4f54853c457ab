"""Layer × step heatmap: the maximum of one per-layer metric per layer and step bucket.

Every layer of a run is folded in one grouped query over block summaries
(``heatmap_store.bucket_layer_blocks``), so a 500-layer heatmap costs one scan of the range's
block summaries, never a query per layer nor a packed value decoded. The bucket width is
rounded up to a whole number of blocks (the run's batch length) and the first bucket to a
block boundary, so a block never straddles two buckets and the maximum of each cell is exact:
a one-step spike always shows. Only when a bucket is narrower than a block and the range
holds at most :data:`DECODE_BLOCKS` blocks (a view zoomed in to a few hundred or thousand
steps) are the blocks decoded and folded in NumPy, for one bucket per step or so.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from ..errors import InvalidQueryError, RunNotFoundError
from ..schemas import HeatmapOut
from ..store import heatmap as heatmap_store
from ..store import runs as run_store
from ..store.block import decode_blocks
from ..store.heatmap import BucketCells
from ..store.metric import METRICS, Metric, Scope

__all__ = ["DECODE_BLOCKS", "MAX_BUCKETS", "read_heatmap"]

MAX_BUCKETS = 2000
"""Hard cap on the step buckets of one heatmap."""

DECODE_BLOCKS = 20_000
"""Most blocks (over all layers) decoded for buckets narrower than a block; a wider zoom gets
buckets one block wide instead (fewer buckets than asked, each still exact)."""

_SIGNIFICANT = "{:.4g}"


def read_heatmap(
    session: Session,
    run_id: str,
    metric: Metric,
    *,
    start: int | None = None,
    end: int | None = None,
    buckets: int = 500,
) -> HeatmapOut:
    """Return the per-layer maximum of ``metric`` in at most ``buckets`` step buckets.

    ``start``/``end`` are inclusive steps; omitted, the range is the run's stored steps.
    Blocks on the database (four queries, or three and one read of packed values when the
    buckets are narrower than a block).

    Raises:
        InvalidQueryError: A run-level metric, ``start > end`` or ``buckets`` outside
            1..:data:`MAX_BUCKETS`.
        RunNotFoundError: No run has this id.
    """
    if METRICS[metric].scope is not Scope.LAYER:
        raise InvalidQueryError(
            f"metric: {metric.value!r} is run-level; the heatmap shows per-layer metrics"
        )
    if start is not None and end is not None and start > end:
        raise InvalidQueryError(f"start: {start} is after end {end}")
    if not 1 <= buckets <= MAX_BUCKETS:
        raise InvalidQueryError(f"buckets: {buckets} is not in 1..{MAX_BUCKETS}")
    if run_store.get_run(session, run_id) is None:
        raise RunNotFoundError(run_id)
    found = heatmap_store.list_layer_series(session, run_id, metric)
    stored = [series_id for series_id in found.series_ids if series_id is not None]
    blocks, values, first, last = (
        heatmap_store.sample_block_extent(session, stored[0]) if stored else (0, 0, 0, -1)
    )
    lo = first if start is None else start
    hi = last if end is None else end
    if not blocks or hi < lo:
        return _empty(run_id, metric, found.layers)
    block_steps = max(1, values // blocks)
    lookback = run_store.max_batch_span(session, run_id)
    width = -(-(hi - lo + 1) // buckets)
    if width < block_steps and (hi - lo + 1) // block_steps * len(stored) <= DECODE_BLOCKS:
        origin = lo
        cells = _decode_cells(session, stored, metric, lo, hi, origin, width, lookback)
    else:
        # Buckets of whole blocks; fewer than asked when a range holds fewer blocks.
        origin = lo - lo % block_steps
        width = -(-(hi - origin + 1) // buckets)
        width = -(-width // block_steps) * block_steps
        cells = heatmap_store.bucket_layer_blocks(session, stored, lo, hi, origin, width, lookback)
    count = (hi - origin) // width + 1
    return _out(run_id, metric, found.layers, found.series_ids, cells, origin, width, count, lo, hi)


def _decode_cells(
    session: Session,
    series_ids: list[int],
    metric: Metric,
    lo: int,
    hi: int,
    origin: int,
    width: int,
    lookback: int,
) -> BucketCells:
    """Fold the decoded values of the range into cells, vectorised per series."""
    kind = METRICS[metric].kind
    parts: list[tuple[int, NDArray[np.int64], NDArray[np.float64]]] = []
    for series_id, series_blocks in heatmap_store.fetch_layer_blocks(
        session, series_ids, lo, hi, lookback
    ).items():
        steps, raw = decode_blocks(series_blocks, kind)
        inside = (steps >= lo) & (steps <= hi)
        parts.append((series_id, (steps[inside] - origin) // width, raw[inside].astype(np.float64)))
    if not parts:
        return heatmap_store.bucket_layer_blocks(session, [], lo, hi, origin, width, lookback)
    series = np.concatenate([np.full(len(b), s, dtype=np.int64) for s, b, _ in parts])
    bucket = np.concatenate([b for _, b, _ in parts])
    value = np.concatenate([v for _, _, v in parts])
    key = series * (MAX_BUCKETS * 8) + bucket
    unique, index = np.unique(key, return_inverse=True)
    nan = np.isnan(value)
    vmax = np.full(len(unique), -np.inf)
    np.maximum.at(vmax, index[~nan], value[~nan])
    valid = np.bincount(index, weights=~nan, minlength=len(unique))
    vmax[valid == 0] = np.nan
    return BucketCells(
        series_id=unique // (MAX_BUCKETS * 8),
        bucket=unique % (MAX_BUCKETS * 8),
        count=np.bincount(index, minlength=len(unique)).astype(np.int64),
        nan_count=np.bincount(index, weights=nan, minlength=len(unique)).astype(np.int64),
        vmax=vmax,
    )


def _out(
    run_id: str,
    metric: Metric,
    layers: list[str],
    series_ids: list[int | None],
    cells: BucketCells,
    origin: int,
    width: int,
    count: int,
    lo: int,
    hi: int,
) -> HeatmapOut:
    row_of = {series_id: row for row, series_id in enumerate(series_ids) if series_id is not None}
    rows = np.array([row_of[int(s)] for s in cells.series_id], dtype=np.int64)
    keep = (cells.bucket >= 0) & (cells.bucket < count)
    rows, bucket = rows[keep], cells.bucket[keep]
    grid = np.full((len(layers), count), np.nan)  # NaN where every value was NaN
    filled = np.zeros((len(layers), count), dtype=bool)
    grid[rows, bucket] = cells.vmax[keep]
    filled[rows, bucket] = True
    nan_cells = [
        [int(r), int(b), int(n)]
        for r, b, n in zip(rows, bucket, cells.nan_count[keep], strict=True)
        if n > 0
    ]
    return HeatmapOut(
        run_id=run_id,
        metric=metric,
        start=lo,
        end=hi,
        bucket_width=width,
        step=(origin + np.arange(count, dtype=np.int64) * width).tolist(),
        layers=layers,
        max=[_row(grid[r], filled[r]) for r in range(len(layers))],
        nan_cells=nan_cells,
    )


def _row(values: NDArray[np.float64], filled: NDArray[np.bool_]) -> list[float | None]:
    """Four significant digits (a colour scale needs no more; the reply stays small)."""
    return [
        (float(_SIGNIFICANT.format(v)) if math.isfinite(v) else float(v)) if f else None
        for v, f in zip(values.tolist(), filled.tolist(), strict=True)
    ]


def _empty(run_id: str, metric: Metric, layers: list[str]) -> HeatmapOut:
    return HeatmapOut(
        run_id=run_id,
        metric=metric,
        start=None,
        end=None,
        bucket_width=1,
        step=[],
        layers=layers,
        max=[[] for _ in layers],
        nan_cells=[],
    )
