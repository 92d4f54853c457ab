"""Layer × step heatmap: the maximum of one per-layer metric per layer and step bucket.

Every layer of a run is read at once, never with a query per layer, in one of three ways
chosen by how much the range holds:

* **rollups** (:mod:`~gradwatch.server.store.rollup`), when the range holds more than
  :data:`BLOCK_ROWS` blocks over all layers (a whole long run): buckets of whole 1,024-step
  chunks, exact per step, a few rows per chunk whatever the number of layers;
* **block summaries** folded in one grouped SQL query: buckets of whole blocks (the run's
  batch length), a block counted in the bucket where it starts;
* **decoded values** folded in NumPy, when a bucket is narrower than a block and the range
  holds at most :data:`DECODE_BLOCKS` blocks (a view zoomed in to a few thousand steps).

Each way takes the maximum over every value of a cell, so a one-step spike always shows.
"""

from __future__ import annotations

from typing import cast

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from ..errors import InvalidQueryError, RunNotFoundError
from ..schemas import HeatmapOut
from ..store import heatmap as heatmap_store
from ..store import rollup as rollup_store
from ..store import runs as run_store
from ..store.block import decode_blocks
from ..store.heatmap import BucketCells
from ..store.metric import METRICS, Metric, Scope
from ..store.rollup import CHUNK_STEPS
from .series import bucket_index

__all__ = ["BLOCK_ROWS", "DECODE_BLOCKS", "MAX_BUCKETS", "four_significant_digits", "read_heatmap"]

MAX_BUCKETS = 2000
"""Hard cap on the step buckets of one heatmap."""

DECODE_BLOCKS = 20_000
"""Most blocks (over all layers) decoded for buckets narrower than a block; a wider zoom gets
buckets one block wide instead (fewer buckets than asked, each still exact)."""

BLOCK_ROWS = 250_000
"""Most block summaries (over all layers) folded in SQL for one heatmap (about 0.3 s on
SQLite); a wider range is read from the chunk rollups instead (a few rows per chunk)."""


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
    elif (hi - lo + 1) // block_steps * len(stored) > BLOCK_ROWS:
        # Buckets of whole rollup chunks; fewer than asked when the range holds fewer chunks.
        origin = lo - lo % CHUNK_STEPS
        width = _round_up(-(-(hi - origin + 1) // buckets), CHUNK_STEPS)
        cells = _rollup_cells(session, run_id, metric, stored, origin, hi, width)
    else:
        # Buckets of whole blocks; fewer than asked when a range holds fewer blocks.
        origin = lo - lo % block_steps
        width = _round_up(-(-(hi - origin + 1) // buckets), block_steps)
        cells = heatmap_store.bucket_layer_blocks(session, stored, lo, hi, origin, width, lookback)
    count = (hi - origin) // width + 1
    return _out(run_id, metric, found.layers, found.series_ids, cells, origin, width, count, lo, hi)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _rollup_cells(
    session: Session,
    run_id: str,
    metric: Metric,
    series_ids: list[int],
    origin: int,
    hi: int,
    width: int,
) -> BucketCells:
    """Fold the rollups of chunks ``origin..hi`` into buckets of ``width`` (whole chunks)."""
    rollups = rollup_store.read_rollups(
        session, run_id, metric, origin // CHUNK_STEPS, hi // CHUNK_STEPS
    )
    listed = np.isin(rollups.series_id, series_ids)
    return _fold(
        rollups.series_id[listed],
        bucket_index(rollups.chunk[listed] * CHUNK_STEPS, origin, width),
        rollups.vmax[listed],
        rollups.nan_count[listed],
    )


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
        parts.append(
            (series_id, bucket_index(steps[inside], origin, width), raw[inside].astype(np.float64))
        )
    if not parts:
        return _fold(*(np.zeros(0, dtype=np.int64),) * 2, np.zeros(0), np.zeros(0, np.int64))
    value = np.concatenate([v for _, _, v in parts])
    return _fold(
        np.concatenate([np.full(len(b), s, dtype=np.int64) for s, b, _ in parts]),
        np.concatenate([b for _, b, _ in parts]),
        value,
        np.isnan(value).astype(np.int64),
    )


def _fold(
    series: NDArray[np.int64],
    bucket: NDArray[np.int64],
    vmax: NDArray[np.float64],
    nan_count: NDArray[np.int64],
) -> BucketCells:
    """Reduce entries to one cell per (series, bucket): the largest ``vmax`` (NaN counts as
    no value unless every entry is NaN) and the summed ``nan_count``."""
    key = series * (MAX_BUCKETS * 8) + bucket
    unique, index = np.unique(key, return_inverse=True)
    out = np.full(len(unique), np.nan)
    np.fmax.at(out, index, vmax)
    return BucketCells(
        series_id=unique // (MAX_BUCKETS * 8),
        bucket=unique % (MAX_BUCKETS * 8),
        nan_count=np.bincount(index, weights=nan_count, minlength=len(unique)).astype(np.int64),
        vmax=out,
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
    stored = np.array([s is not None for s in series_ids], dtype=bool)
    ids = np.array([s for s in series_ids if s is not None], dtype=np.int64)
    order = np.argsort(ids)
    rows = np.flatnonzero(stored)[order][np.searchsorted(ids[order], cells.series_id)]
    keep = (cells.bucket >= 0) & (cells.bucket < count)
    rows, bucket, nans = rows[keep], cells.bucket[keep], cells.nan_count[keep]
    grid = np.full((len(layers), count), np.nan)  # NaN where every value was NaN
    filled = np.zeros((len(layers), count), dtype=bool)
    grid[rows, bucket] = cells.vmax[keep]
    filled[rows, bucket] = True
    with_nan = nans > 0
    nan_cells = np.column_stack([rows[with_nan], bucket[with_nan], nans[with_nan]]).tolist()
    return HeatmapOut(
        run_id=run_id,
        metric=metric,
        start=lo,
        end=hi,
        bucket_width=width,
        step=[origin + index * width for index in range(count)],  # Python ints: width may be 2⁶³
        layers=layers,
        max=_rows(grid, filled),
        nan_cells=nan_cells,
    )


def _rows(grid: NDArray[np.float64], filled: NDArray[np.bool_]) -> list[list[float | None]]:
    """The grid as JSON rows: four significant digits (a colour scale needs no more and the
    reply stays small), ``None`` for empty cells."""
    cells = four_significant_digits(grid).astype(object)
    cells[~filled] = None
    return cast(list[list[float | None]], cells.tolist())


def four_significant_digits(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Round to four significant digits: the double nearest the 4-digit decimal, which prints
    short. Vectorised where the power of ten that scales a value is exact (10**0..10**22,
    magnitudes 1e-19..1e26); other magnitudes go through Python's correctly rounded format.
    NaN, ±Inf and 0 are left as they are."""
    out = values.copy()
    magnitude = np.abs(values)
    finite = np.isfinite(values) & (magnitude > 0)
    shift = np.zeros(values.shape)
    shift[finite] = 3 - np.floor(np.log10(magnitude[finite]))
    fast = finite & (np.abs(shift) <= 22)
    v, scale = values[fast], 10.0 ** np.abs(shift[fast])
    up = shift[fast] >= 0  # multiply then divide by the exact power of ten, else the reverse
    out[fast] = np.where(up, np.rint(v * scale) / scale, np.rint(v / scale) * scale)
    slow = finite & ~fast
    out[slow] = [float(f"{x:.4g}") for x in values[slow].tolist()]
    return out


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
